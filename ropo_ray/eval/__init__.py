"""Evaluation: metric functions (pure) apart from the vLLM sampling and the report."""
