"""Preference data: the built-in demo task, tokenisation as pure per-row functions, and (in its own
module) the Ray Data wiring.

Kept light: importing `ropo_ray.data` loads nothing; `ropo_ray.data.task` is pure Python and
`ropo_ray.data.tokenize` needs only a tokenizer object, so both are tested without Ray.
"""
