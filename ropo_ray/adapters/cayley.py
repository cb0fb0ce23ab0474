"""Skew-symmetric blocks from their parameters and their exact or approximate Cayley transform (ROPO_SPEC.md
section 2; arXiv 2508.17637): the orthogonal blocks Q = Cayley(S) of which rotation.py builds each factor of R.
"""

from __future__ import annotations

import functools

import torch


def num_skew_params(block_size: int) -> int:
    """Free parameters of one b x b skew-symmetric matrix: b(b-1)/2."""
    return block_size * (block_size - 1) // 2


def skew_from_params(params: torch.Tensor, block_size: int) -> torch.Tensor:
    """[..., nb, b(b-1)/2] -> [..., nb, b, b] skew-symmetric S (S^T = -S), upper triangle from params (row by
    row). One matmul with a constant 0/+-1 basis, forward and backward (exact: one nonzero term per entry),
    where scattering into a zero tensor and subtracting its transpose took four indexing passes per step."""
    b = block_size
    return (params @ _skew_basis(b, params.dtype, params.device)).view(*params.shape[:-1], b, b)


@functools.cache
def _skew_basis(b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[b(b-1)/2, b * b]: row p has +1 at S's entry (r, c) and -1 at (c, r), (r, c) the p-th of the upper triangle."""
    rows, cols = torch.triu_indices(b, b, offset=1)
    basis = torch.zeros(len(rows), b * b, dtype=dtype)
    basis[torch.arange(len(rows)), rows * b + cols] = 1
    basis[torch.arange(len(rows)), cols * b + rows] = -1
    return basis.to(device)


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform Q = (I + S)^-1 (I - S) of skew S [..., b, b], in fp32.

    I + S is always invertible for real skew S (its eigenvalues are 1 + i*lambda), and the two
    factors commute, so this equals (I - S)(I + S)^-1; Q is orthogonal with det 1. Computed as
    Q = 2 (I + S)^-1 - I (since I - S = 2I - (I + S)) by `_CayleyInverse`.
    """
    return _CayleyInverse.apply(skew.float())


def _unit_plus_inverse(s: torch.Tensor) -> torch.Tensor:
    """(I + S)^-1 for skew S [..., b, b] by Gauss-Jordan elimination without pivoting, batched: b steps of three
    tensor ops on [b, 2b, blocks], the blocks innermost so every op runs along them. torch.linalg.solve on these
    blocks runs LAPACK's LU once per block (3,200 blocks of 8 x 8 per step in the benchmark model), at about a
    microsecond each.

    No pivoting is needed: A = I + S has symmetric part (A + A^T) / 2 = I, and so does every Schur complement
    taken in the elimination (C = A22 + A12^T A11^-1 A12, and x^T A11^-1 x = |A11^-1 x|^2, so x^T C x >= |x|^2),
    so every pivot is >= 1 and no multiplier is larger than the entry it is taken from."""
    b, lead = s.shape[-1], s.shape[:-2]
    eye = torch.eye(b, dtype=s.dtype, device=s.device)[:, :, None]  # [b, b, 1]
    blocks = s.reshape(-1, b, b).permute(1, 2, 0)  # [b, b, N]
    work = torch.cat([eye + blocks, eye.expand_as(blocks)], dim=1)  # [b, 2b, N]: [A | I] -> [I | A^-1]
    for k in range(b):
        pivot_row = work[k:k + 1] / work[k:k + 1, k:k + 1]  # [1, 2b, N]
        # Row i loses factor_i times the pivot row; factor_k = pivot - 1 turns row k itself into the pivot row.
        factors = work[:, k:k + 1] - eye[:, k:k + 1]  # [b, 1, N]
        work = torch.addcmul(work, factors, pivot_row, value=-1.0)
    return work[:, b:].permute(2, 0, 1).contiguous().view(*lead, b, b)


class _CayleyInverse(torch.autograd.Function):
    """Q = 2 M - I with M = (I + S)^-1; dQ = -2 M dS M, so dL/dS = -2 M^T (dL/dQ) M^T: two batched matmuls,
    where autograd through a solve runs LAPACK once more per block."""

    @staticmethod
    def forward(ctx, s: torch.Tensor) -> torch.Tensor:
        m = _unit_plus_inverse(s)
        ctx.save_for_backward(m)
        return 2 * m - torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (m,) = ctx.saved_tensors
        b = m.shape[-1]
        # Contiguous [N, b, b] operands: CPU bmm on strided views goes block by block.
        mt = m.transpose(-1, -2).contiguous().view(-1, b, b)
        return (-2 * torch.bmm(torch.bmm(mt, grad.contiguous().view(-1, b, b)), mt)).view(m.shape)


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """Approximate Cayley with (I + S)^-1 ~ sum_{k<terms} (-S)^k; exact up to O(||S||^terms).

    Cheaper than a solve for large blocks; orthogonal only approximately (the error is reported
    by `orthogonality_error`), and only while ||S|| < 1.
    """
    s = skew.float()
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)
    inv = eye.clone()
    power = eye
    for _ in range(terms - 1):
        power = -power @ s
        inv = inv + power
    return inv @ (eye - s)
