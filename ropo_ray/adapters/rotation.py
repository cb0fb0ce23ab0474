"""Multi-granularity orthogonal rotations as pure functions (ROPO_SPEC.md section 2).

RoPO (arXiv 2508.17637) turns each frozen weight W by an orthogonal R and a per-neuron magnitude:
W' = diag(m / c) W R^T. We build R as a product of block-diagonal factors of several block sizes,

    R = R_(b1) R_(b2) ... R_(bK),    R_(b) = P_b^T blockdiag(Q_1, ..., Q_{d/b}) P_b,

each block Q_j = Cayley(S_j) = (I + S_j)^-1 (I - S_j) in SO(b) with S_j skew-symmetric
(b(b-1)/2 free parameters, zero at init so Q = I). The permutation P_b (identity for the first
factor) makes coarse and fine blocks straddle each other; with aligned nested blocks the product
would stay block-diagonal at the largest size (more parameters, no more mixing). The papers'
own construction could not be read; this is our choice, and the mixing scheme is configurable.

Convention: activations are row vectors, so `apply_rotation(x, ...)` returns x @ R, i.e. R^T x in
column form, which is what the layer needs: y = (m / c) * (W (R^T x)).

When b does not divide d the tail block covers the remaining r < b dimensions: its skew matrix is
masked to the top-left r x r, so the block is a rotation in SO(r) on the real dimensions and the
identity on the padding (never a silently changed block size).
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from ropo_ray.adapters.cayley import cayley, cayley_neumann, num_skew_params, skew_from_params

Mixing = Literal["shift", "stride", "none"]


def mixing_permutation(dim: int, block_size: int, factor_index: int, mixing: Mixing) -> torch.Tensor | None:
    """Index permutation `perm` of the factor: the factor acts on x[..., perm] in contiguous blocks.

    - none: identity (aligned blocks);
    - shift: roll by b/2 for every factor after the first, so its blocks straddle the previous
      factors' block boundaries (and the largest size's: offsets b/2 are never multiples of b);
    - stride: block j holds dimensions {j, j + s, j + 2s, ...} with s = ceil(d / b), mixing
      dimensions far apart (a butterfly-like shuffle).
    Returns None for the identity so callers skip the gather.
    """
    if factor_index == 0 or mixing == "none":
        return None
    idx = torch.arange(dim)
    if mixing == "shift":
        return torch.roll(idx, shifts=-(block_size // 2))
    if mixing == "stride":
        stride = math.ceil(dim / block_size)
        return torch.sort(idx % stride * dim + idx // stride).indices
    raise ValueError(f"unknown mixing scheme {mixing!r}; expected shift, stride or none")


def tail_mask(dim: int, block_size: int) -> torch.Tensor | None:
    """[nb, b(b-1)/2] 0/1 mask keeping the tail block inside SO(r), r = d mod b; None when b | d."""
    rem = dim % block_size
    if rem == 0:
        return None
    nb = math.ceil(dim / block_size)
    rows, cols = torch.triu_indices(block_size, block_size, offset=1)
    mask = torch.ones(nb, rows.numel())
    mask[-1] = ((rows < rem) & (cols < rem)).float()
    return mask


@dataclass(frozen=True)
class FactorLayout:
    """Static layout of one factor: its block size, blocks, permutation and tail mask."""

    block_size: int
    num_blocks: int
    perm: torch.Tensor | None  # [d] or None (identity)
    inv_perm: torch.Tensor | None  # [d]
    mask: torch.Tensor | None  # [nb, b(b-1)/2] or None

    @property
    def num_params(self) -> int:
        """Stored parameters (including masked tail entries)."""
        return self.num_blocks * num_skew_params(self.block_size)

    @property
    def num_free_params(self) -> int:
        """Parameters that can move the rotation (masked tail entries excluded)."""
        return self.num_params if self.mask is None else int(self.mask.sum().item())


def factor_layouts(dim: int, block_sizes: tuple[int, ...], mixing: Mixing) -> list[FactorLayout]:
    """The layout of every factor of R for input dimension `dim`."""
    layouts = []
    for k, b in enumerate(block_sizes):
        if b < 2:
            raise ValueError(f"block size {b} must be >= 2")
        if b > dim:
            raise ValueError(f"block size {b} is larger than the layer's input dimension {dim}")
        perm = mixing_permutation(dim, b, k, mixing)
        inv = None if perm is None else torch.argsort(perm)
        layouts.append(FactorLayout(b, math.ceil(dim / b), perm, inv, tail_mask(dim, b)))
    return layouts


def factor_blocks(params: torch.Tensor, layout: FactorLayout, method: str = "exact", terms: int = 5) -> torch.Tensor:
    """Skew parameters [..., nb, b(b-1)/2] -> orthogonal blocks [..., nb, b, b] (fp32); leading dimensions batch
    several layers of the same layout."""
    if layout.mask is not None:
        params = params * layout.mask.to(params.device, params.dtype)
    skew = skew_from_params(params.float(), layout.block_size)
    return cayley(skew) if method == "exact" else cayley_neumann(skew, terms)


def apply_blocks(x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x [..., d] @ blockdiag(blocks) (or its transpose), blocks [nb, b, b]; pads the tail with zeros.

    Batched small matmuls: no d x d matrix is formed.
    """
    nb, b, _ = blocks.shape
    d = x.shape[-1]
    pad = nb * b - d
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    xb = x.reshape(*x.shape[:-1], nb, b)  # [..., nb, b]
    q = blocks.transpose(-1, -2) if transpose else blocks
    out = torch.einsum("...nb,nbc->...nc", xb, q.to(x.dtype)).reshape(*x.shape[:-1], nb * b)
    return out[..., :d] if pad else out


def apply_factor(x: torch.Tensor, blocks: torch.Tensor, layout: FactorLayout, transpose: bool = False) -> torch.Tensor:
    """x [..., d] @ R_(b) (or R_(b)^T) with R_(b) = P^T blockdiag(Q) P."""
    if layout.perm is not None:
        x = x[..., layout.perm.to(x.device)]
    x = apply_blocks(x, blocks, transpose)
    if layout.inv_perm is not None:
        x = x[..., layout.inv_perm.to(x.device)]
    return x


def apply_rotation(
    x: torch.Tensor, blocks: list[torch.Tensor], layouts: list[FactorLayout], inverse: bool = False
) -> torch.Tensor:
    """x [..., d] @ R with R = R_(b1) ... R_(bK); with inverse=True, x @ R^T."""
    pairs = list(zip(blocks, layouts))
    for q, layout in reversed(pairs) if inverse else pairs:
        x = apply_factor(x, q, layout, transpose=inverse)
    return x


def rotation_matrix(blocks: list[torch.Tensor], layouts: list[FactorLayout], dim: int) -> torch.Tensor:
    """The dense R [d, d] (for tests, diagnostics and small merges): I @ R."""
    eye = torch.eye(dim, dtype=torch.float32, device=blocks[0].device)
    return apply_rotation(eye, blocks, layouts)


def orthogonality_error(blocks: list[torch.Tensor]) -> float:
    """max over factors of ||Q^T Q - I||_max: 0 for exact Cayley up to rounding."""
    worst = 0.0
    for q in blocks:
        q = q.float()
        eye = torch.eye(q.shape[-1], device=q.device)
        worst = max(worst, (q.transpose(-1, -2) @ q - eye).abs().max().item())
    return worst


def merge_weight(weight: torch.Tensor, scale: torch.Tensor, blocks: list[torch.Tensor],
                 layouts: list[FactorLayout]) -> torch.Tensor:
    """W' = diag(scale) W R^T for W [n, d] (rows are neurons): each row w_i -> scale_i * w_i @ R^T."""
    rotated = apply_rotation(weight.float(), blocks, layouts, inverse=True)  # [n, d]
    return (scale.float()[:, None] * rotated).to(weight.dtype)


# --- The banded form (CPU kernel) --------------------------------------------------------------------
#
# With "shift" or "none" mixing, factor R_(b) only moves a coordinate within its block of b consecutive
# coordinates (circularly: the shifted blocks wrap around the end), so R_(b) is a circulant band of
# half-width w = b - 1:  (x @ R_(b))[i] = sum_{o=-w..w} x[(i + o) mod d] * c[o + w, i]. Applying the K
# factors in this form needs no permutation copy and lets one pass over a row (in cache) apply all of
# them (kernels/band_chain.c). "stride" mixing is not banded: it keeps the block-matmul form above.
#
# When b divides the kernel's vector length (a power of two up to 16 floats with AVX-512), the kernel takes
# the factor in its lane form instead: in the factor's frame (stream position k is coordinate
# (offset + k) mod d) the blocks are aligned to the vectors, and (x @ R_(b))[k] = sum_{s<b} x[m_s(k)] c[s, k]
# with m_s(k) = b * (k // b) + (k + s) mod b: b multiply-adds per coordinate instead of the band's 2b - 1.


@dataclass(frozen=True)
class BandLayout:
    """How the kernel applies one factor, and where each coefficient comes from in the factor's blocks.

    Band form (`lanes` = 0): c[k, i], tap-major [2w + 1, d]. Lane form (`lanes` = b): c[s, k], [b, dp] with dp
    the dimension rounded up to whole vectors of the kernel (the padding's coefficients are zero)."""

    width: int  # band: half-width w = b - 1; lane form: 0
    index: torch.Tensor  # long, c's shape: position in blocks.reshape(-1) ([nb, b, b] flattened)
    mask: torch.Tensor  # c's shape, 0/1: 1 where the coefficient is one of the block's entries
    lanes: int = 0  # lane form: the block size b; 0: band form
    offset: int = 0  # lane form: the factor's shift (stream position k is coordinate (offset + k) mod d)


def _roll_offset(dim: int, layout: FactorLayout) -> int | None:
    """o when the factor's permutation is a roll (perm[i] = (i + o) mod d; 0 for none), else None."""
    if layout.perm is None:
        return 0
    offset = int(layout.perm[0])
    return offset if torch.equal(layout.perm.cpu(), (torch.arange(dim) + offset) % dim) else None


def band_layout(dim: int, layout: FactorLayout, lanes: int = 0) -> BandLayout | None:
    """The factor in the kernel's lane form when its block size divides `lanes` (the kernel's vector length,
    `native.vector_lanes()`; 0: never), else as a circulant band of half-width b - 1; None when it is neither
    (stride mixing)."""
    b = layout.block_size
    offset = _roll_offset(dim, layout)
    if lanes and offset is not None and lanes % b == 0:
        return _lane_layout(dim, layout, lanes, offset)
    w = b - 1
    if dim < 2 * w + 1:  # offsets o and o - d would name the same coordinate
        return None
    inv = torch.arange(dim) if layout.inv_perm is None else layout.inv_perm.cpu()
    cols = torch.arange(dim)[None, :]
    offsets = torch.arange(-w, w + 1)[:, None]
    rows = (cols + offsets) % dim  # [taps, d]: the input coordinate feeding output i through tap k
    q, p = inv[rows], inv[cols].expand_as(rows)  # positions after the permutation
    same = (q // b) == (p // b)
    members = torch.bincount(inv // b, minlength=layout.num_blocks)[inv // b]  # real size of i's block
    if not torch.equal(same.sum(0), members):  # some block-mate lies further than w away: not a band
        return None
    index = torch.where(same, (q // b) * b * b + (q % b) * b + (p % b), 0)
    return BandLayout(w, index, same.float())


def _lane_layout(dim: int, layout: FactorLayout, lanes: int, offset: int) -> BandLayout:
    """c[s, k] = Q_j[(r + s) mod b, r] for stream position k = j b + r < d (x @ Q: row (r + s) mod b of the
    block feeds column r); zero where that row is past the tail block's real size, or k >= d."""
    b = layout.block_size
    padded = -(-dim // lanes) * lanes
    k = torch.arange(padded)[None, :]
    s = torch.arange(b)[:, None]
    j, r = k // b, k % b
    source = (r + s) % b  # [b, dp]
    size = torch.clamp(dim - j * b, max=b)  # the block's real size (the tail block's may be < b)
    mask = (k < dim) & (source < size)
    index = torch.where(mask, j * b * b + source * b + r, 0)
    return BandLayout(0, index, mask.float(), lanes=b, offset=offset)


@functools.cache
def shared_factor_layouts(dim: int, block_sizes: tuple[int, ...], mixing: Mixing) -> list[FactorLayout]:
    """`factor_layouts`, computed once per process and shared by every layer of that shape (their index
    tensors are read, never written)."""
    return factor_layouts(dim, block_sizes, mixing)


@functools.cache
def kernel_layouts(dim: int, block_sizes: tuple[int, ...], mixing: Mixing, lanes: int) -> list[BandLayout | None]:
    """The kernel forms of `shared_factor_layouts(dim, block_sizes, mixing)`, shared the same way (a model's
    forty adapted 640-wide layers held 13 MiB of identical index tensors before)."""
    return [band_layout(dim, lay, lanes) for lay in shared_factor_layouts(dim, block_sizes, mixing)]


def band_coefficients(blocks: torch.Tensor, band: BandLayout) -> torch.Tensor:
    """The factor's kernel coefficients (fp32, the layout's shape) from its orthogonal blocks [nb, b, b]; blocks
    [L, nb, b, b] of L layers give [L, *shape]."""
    flat = blocks.float().reshape(*blocks.shape[:-3], -1)
    return flat[..., band.index.to(blocks.device)] * band.mask.to(blocks.device)


def bf16_flag(t: torch.Tensor) -> int:
    """The kernels' per-tensor dtype flag: 1 for bfloat16 rows, 0 for float32."""
    return int(t.dtype == torch.bfloat16)


def pack_coefficients(coefs: tuple[torch.Tensor, ...] | list[torch.Tensor], layers: int = 0) -> torch.Tensor:
    """Every factor's kernel coefficients, concatenated in factor order (the kernel's layout): [ncoef]; with
    `layers` = L > 0, coefficients [L, ...] of L layers give one row per layer, [L, ncoef]."""
    if layers:
        return torch.cat([c.reshape(layers, -1) for c in coefs], dim=1).contiguous()
    return torch.cat([c.reshape(-1) for c in coefs]).contiguous()


def kernel_spec(bands: tuple[BandLayout, ...]) -> ctypes.Array:
    """The kernel's per-factor (kind, size, offset): (0, w, 0) for a band, (1, b, offset) for the lane form."""
    spec = [v for band in bands for v in ((1, band.lanes, band.offset) if band.lanes else (0, band.width, 0))]
    return (ctypes.c_int * len(spec))(*spec)


def band_chain_forward(rows: torch.Tensor, packed: torch.Tensor, spec: ctypes.Array) -> torch.Tensor:
    """rows [T, d] (contiguous, float32 or bfloat16) @ R by the native kernel, in rows' dtype."""
    from ropo_ray.adapters.native import library

    out = torch.empty_like(rows)
    library().chain_forward(rows.data_ptr(), bf16_flag(rows), out.data_ptr(), bf16_flag(out), packed.data_ptr(),
                            spec, len(spec) // 3, rows.shape[0], rows.shape[1], torch.get_num_threads())
    return out


def band_chain_backward(rows: torch.Tensor, packed: torch.Tensor, grad: torch.Tensor, bands: tuple[BandLayout, ...],
                        spec: ctypes.Array) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `band_chain_forward` for rows and for the packed coefficients (packed like them)."""
    from ropo_ray.adapters.native import library

    d = rows.shape[-1]
    g = grad.reshape(-1, d).contiguous()
    grad_x = torch.empty_like(rows)
    grad_coef = torch.empty_like(packed)
    library().chain_backward(rows.data_ptr(), bf16_flag(rows), g.data_ptr(), bf16_flag(g), grad_x.data_ptr(),
                             bf16_flag(grad_x), packed.data_ptr(), grad_coef.data_ptr(), spec, len(bands),
                             rows.shape[0], d, torch.get_num_threads())
    return grad_x, grad_coef


def unpack_coefficients(packed: torch.Tensor, bands: tuple[BandLayout, ...]) -> list[torch.Tensor]:
    """The inverse of `pack_coefficients` for one layer: each factor's coefficients in its layout's shape."""
    sizes = [band.index.numel() for band in bands]
    return [c.reshape(band.index.shape) for c, band in zip(packed.split(sizes), bands)]


class _BandChain(torch.autograd.Function):
    """x @ R_(b1) ... R_(bK) by the native kernel; gradients for x and every factor's band coefficients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bands: tuple[BandLayout, ...], *coefs: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        packed, spec = pack_coefficients(coefs), kernel_spec(bands)
        out = band_chain_forward(rows, packed, spec)
        ctx.save_for_backward(rows, packed)
        ctx.bands, ctx.spec, ctx.shape = bands, spec, x.shape
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, packed = ctx.saved_tensors
        grad_x, grad_packed = band_chain_backward(rows, packed, grad, ctx.bands, ctx.spec)
        return (grad_x.reshape(ctx.shape), None, *unpack_coefficients(grad_packed, ctx.bands))


def apply_rotation_banded(x: torch.Tensor, blocks: list[torch.Tensor], bands: list[BandLayout]) -> torch.Tensor:
    """x @ R like `apply_rotation`, through the native band kernel (x float32 or bfloat16, on the CPU)."""
    coefs = [band_coefficients(q, band) for q, band in zip(blocks, bands)]
    return _BandChain.apply(x, tuple(bands), *coefs)
