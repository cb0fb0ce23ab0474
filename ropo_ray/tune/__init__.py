"""Ray Tune sweeps: search spaces from config, and one Tune driver function per trial that fits a TorchTrainer."""
