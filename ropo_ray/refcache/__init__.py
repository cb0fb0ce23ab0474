"""Reference log-probs: the torch computation, the Ray Data actor-pool wiring, the content-keyed cache."""
