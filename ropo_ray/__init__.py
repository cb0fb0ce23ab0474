"""ropo-ray: Weights-Rotated Preference Optimization (RoPO, arXiv 2508.17637) on Ray.

Kept light on purpose: importing the package loads nothing heavy, so the math modules
(`ropo_ray.adapters`, `ropo_ray.losses`) import on their own without Ray, DeepSpeed or vLLM.
"""

__version__ = "0.1.0"
