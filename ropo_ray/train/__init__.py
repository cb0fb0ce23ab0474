"""Training: the torch-only SFT run that builds the demo reference model, the preference-training step,
the DeepSpeed config builder and the per-worker loop. Kept light: importing it loads nothing.
"""
