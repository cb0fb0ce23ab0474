"""Adapters: RoPO's rotation maths as pure functions, the rotated linear module, injection, merge,
and the peft baselines (LoRA / OFT / BOFT) plus full-weight training behind one interface.

Import the submodules directly (`ropo_ray.adapters.rotation`, ...): this file stays empty of imports
so the math loads without peft or transformers.
"""
