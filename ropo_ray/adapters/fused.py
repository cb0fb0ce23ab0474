"""The RoPO layer on CPU activations as one autograd function: band rotation, frozen matmul, output scale.

    y = s * (W (R^T x)) + b,    s = m / c               (ROPO_SPEC.md section 1; arXiv 2508.17637)

Composed from tensor ops (ropo_linear.py's general path) the scale costs three passes over every
[tokens, out] activation beyond the frozen linear's, each into a fresh buffer: y * s in the forward, then
g * s and the sum over tokens of g * u for the magnitude's gradient in the backward, with the unscaled u
kept for it. Here the forward scales the matmul's output and adds the bias in place, in one pass of the
native kernel (`scale_forward`; on bfloat16 torch's in-place multiply by the float32 scale converted the
output to float32 and back), and keeps only the layer's output; the backward computes g * s and the
magnitude's gradient in one pass of the native kernel (kernels/band_chain.c `scale_backward`), recovering
u = (y - b) / s from the saved output. The rotated
input R^T x is not kept: the band kernel's backward recomputes it from x, which the layer's callers keep
anyway (q, k and v share one).

Where some s is zero (a magnitude trained to 0) u cannot be recovered from the output: the forward then keeps
a copy of u and the backward takes the scale's gradients from it with tensor ops (the rest stays fused). The
kernel counts the zeros (`count_zeros`), which spares every call the tensor ops and the sync of asking torch.

Used only where it is exact and safe: the native kernel is loaded and the weight is an ordinary tensor (not a
ZeRO-3 partition, whose gathering needs the base module to be called). The output is saved for the backward,
so a model that changes it in place gets autograd's error at that line, never a silently wrong gradient
(adapter.kernel=torch takes the composed ops).
"""

from __future__ import annotations

import torch

from ropo_ray.adapters.rotation import (
    BandLayout,
    band_chain_backward,
    band_chain_forward,
    bf16_flag,
    kernel_spec,
)


class _RotatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, magnitude: torch.Tensor,
                row_norms: torch.Tensor, bands: tuple[BandLayout, ...], packed: torch.Tensor) -> torch.Tensor:
        from ropo_ray.adapters.native import library

        n, d = weight.shape
        rows = x.reshape(-1, d).contiguous()  # [T, d]
        packed, spec = packed.contiguous(), kernel_spec(bands)
        scale = (magnitude.float() / row_norms.float()).contiguous()  # [n] fp32
        out = torch.mm(band_chain_forward(rows, packed, spec), weight.t())  # [T, n]; R^T x freed here
        unscaled = out.clone() if library().count_zeros(scale.data_ptr(), n) else torch.empty(0)
        bias32 = bias.float().contiguous() if bias is not None else None
        library().scale_forward(out.data_ptr(), bf16_flag(out), scale.data_ptr(),
                                None if bias32 is None else bias32.data_ptr(), out.shape[0], n, torch.get_num_threads())
        out = out.view(*x.shape[:-1], n)
        ctx.save_for_backward(rows, packed, out, scale, weight, row_norms,
                              bias32 if bias32 is not None else torch.empty(0), unscaled)
        ctx.bands, ctx.spec, ctx.has_bias, ctx.magnitude_dtype = bands, spec, bias is not None, magnitude.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from ropo_ray.adapters.native import library

        # bias32: the fp32 bias, or empty; unscaled: u = W R^T x when some s is zero, else empty
        rows, packed, out, scale, weight, row_norms, bias32, unscaled = ctx.saved_tensors
        n = weight.shape[0]
        g = grad.reshape(-1, n).contiguous()  # [T, n]
        if unscaled.numel():
            grad_u = (g.float() * scale).to(g.dtype)
            grad_scale = (g.float() * unscaled.float()).sum(0)
        else:
            y = out.reshape(-1, n)
            grad_u = torch.empty_like(g)
            grad_scale = torch.empty(n, dtype=torch.float32)
            library().scale_backward(g.data_ptr(), bf16_flag(g), y.data_ptr(), bf16_flag(y), scale.data_ptr(),
                                     bias32.data_ptr() if ctx.has_bias else None, grad_u.data_ptr(),
                                     bf16_flag(grad_u), grad_scale.data_ptr(), g.shape[0], n,
                                     torch.get_num_threads())
        grad_rot = torch.mm(grad_u, weight)  # [T, d]
        del grad_u
        grad_x, grad_packed = band_chain_backward(rows, packed, grad_rot, ctx.bands, ctx.spec)
        grad_m = (grad_scale / row_norms.float()).to(ctx.magnitude_dtype) if ctx.needs_input_grad[3] else None
        return (grad_x.view(grad.shape[:-1] + (rows.shape[-1],)), None, None, grad_m, None, None, grad_packed)


def rotated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, magnitude: torch.Tensor,
                   row_norms: torch.Tensor, packed: torch.Tensor, bands: list[BandLayout]) -> torch.Tensor:
    """s * (W (x @ R)) + b for CPU x [..., d] (float32 / bfloat16), R given by its factors' kernel coefficients,
    packed (rotation.pack_coefficients)."""
    return _RotatedLinear.apply(x, weight, bias, magnitude, row_norms, tuple(bands), packed)
