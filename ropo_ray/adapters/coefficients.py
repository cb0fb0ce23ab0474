"""The band kernel's packed coefficients of R straight from the rotation parameters, in the native kernel.

Composed from tensor ops (cayley.py's exact Cayley, then rotation.band_coefficients and pack_coefficients) one
step's coefficients of a model's forty adapted layers took about thirty small ops per factor each way: 7 ms
forward and 5 ms backward on a 2-core Zen 4, 2% of a bf16 training step of issue 8's 49M model, for arithmetic
of a few hundred thousand multiply-adds (BENCHMARKS.md, session 20). `packed_coefficients` does the same
computation, forward and backward, in kernels/band_chain.c (`cayley_coefficients`): per block the Gauss-Jordan
inverse M = (I + S)^-1, Q = 2 M - I (ROPO_SPEC.md section 2; arXiv 2508.17637), gathered into the kernel's
layout; the backward scatters the coefficients' gradient back onto the blocks and takes dL/dS = -2 M^T G M^T.
Exact Cayley only; `cayley="neumann"` keeps the composed ops.
"""

from __future__ import annotations

import torch

from ropo_ray.adapters.cayley import num_skew_params
from ropo_ray.adapters.rotation import BandLayout, FactorLayout


class _PackedCoefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layouts: tuple[FactorLayout, ...], bands: tuple[BandLayout, ...],
                *params: torch.Tensor) -> torch.Tensor:
        from ropo_ray.adapters.native import library

        layers, threads = params[0].shape[0], torch.get_num_threads()
        sizes = [band.index.numel() for band in bands]
        out = torch.empty(layers, sum(sizes), dtype=torch.float32)
        saved, offset = [], 0
        for p, layout, band, size in zip(params, layouts, bands, sizes):
            p32 = p.float() if layout.mask is None else p.float() * layout.mask
            p32 = p32.contiguous()
            b, nb = layout.block_size, layout.num_blocks
            m = torch.empty(layers, nb, b, b, dtype=torch.float32)
            library().cayley_coefficients(p32.data_ptr(), layers, nb, b, band.index.data_ptr(), band.mask.data_ptr(),
                                          size, out.data_ptr() + 4 * offset, out.shape[1], m.data_ptr(), threads)
            saved.append(m)
            offset += size
        ctx.save_for_backward(*saved)
        ctx.layouts, ctx.bands, ctx.sizes, ctx.dtypes = layouts, bands, sizes, [p.dtype for p in params]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from ropo_ray.adapters.native import library

        grad = grad.float().contiguous()
        layers, threads, offset, grads = grad.shape[0], torch.get_num_threads(), 0, []
        for m, layout, band, size, dtype in zip(ctx.saved_tensors, ctx.layouts, ctx.bands, ctx.sizes, ctx.dtypes):
            b, nb = layout.block_size, layout.num_blocks
            g = torch.empty(layers, nb, num_skew_params(b), dtype=torch.float32)
            library().cayley_coefficients_backward(grad.data_ptr() + 4 * offset, grad.shape[1], band.index.data_ptr(),
                                                   band.mask.data_ptr(), size, m.data_ptr(), layers, nb, b,
                                                   g.data_ptr(), threads)
            if layout.mask is not None:
                g *= layout.mask
            grads.append(g.to(dtype))
            offset += size
        return (None, None, *grads)


def packed_coefficients(params: list[torch.Tensor], layouts: list[FactorLayout],
                        bands: list[BandLayout]) -> torch.Tensor:
    """[L, ncoef] fp32: each layer's kernel coefficients of R = R_(b1) ... R_(bK) under exact Cayley, factors
    in order (rotation.pack_coefficients' layout), from params[f] [L, nb_f, b_f(b_f - 1)/2] (CPU, any float
    dtype; gradients flow back to them)."""
    if any(p.device.type != "cpu" for p in params):
        raise ValueError("packed_coefficients runs on the CPU (the band kernel's coefficients)")
    for band in bands:  # the kernel reads them in place
        if band.index.dtype != torch.int64 or band.mask.dtype != torch.float32 or not (
                band.index.is_contiguous() and band.mask.is_contiguous()):
            raise ValueError("band layouts hold contiguous int64 index and float32 mask tensors")
    return _PackedCoefficients.apply(tuple(layouts), tuple(bands), *params)
