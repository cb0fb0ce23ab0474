"""The band kernel's coefficients computed natively from the skew parameters (adapters/coefficients.py) against a
value worked by hand and against float64 autograd through torch.linalg.solve (Q = (I + S)^-1 (I - S), built here
from the parameters' definition, never through cayley.py)."""

from __future__ import annotations

import pytest
import torch

from ropo_ray.adapters import rotation as rot
from ropo_ray.adapters.coefficients import packed_coefficients
from ropo_ray.adapters.native import vector_lanes


def test_one_two_by_two_block_by_hand():
    """S = [[0, a], [-a, 0]], a = 1/2: Q = [[1 - a^2, -2a], [2a, 1 - a^2]] / (1 + a^2) = [[0.6, -0.8], [0.8, 0.6]].
    In the lane form c[s, k] = Q[(k + s) mod 2, k]: c[0] = (0.6, 0.6), c[1] = (0.8, -0.8), zeros past d = 2.
    dc[0, 0]/da = d/da (1 - a^2)/(1 + a^2) = -4a / (1 + a^2)^2 = -1.28; dc[1, 0]/da = 2(1 - a^2)/(1 + a^2)^2 = 0.96."""
    layouts = rot.factor_layouts(2, (2,), "none")
    bands = rot.kernel_layouts(2, (2,), "none", vector_lanes())
    assert bands[0].lanes == 2
    a = torch.tensor([[[0.5]]], requires_grad=True)  # [L=1, nb=1, p=1]
    packed = packed_coefficients([a], layouts, bands)[0].view(2, -1)  # [b, dp]
    assert torch.allclose(packed[:, :2], torch.tensor([[0.6, 0.6], [0.8, -0.8]]), atol=1e-6)
    assert torch.count_nonzero(packed[:, 2:]) == 0
    packed[0, 0].backward()
    assert a.grad.item() == pytest.approx(-1.28, abs=1e-6)
    a.grad = None
    packed = packed_coefficients([a], layouts, bands)[0].view(2, -1)
    packed[1, 0].backward()
    assert a.grad.item() == pytest.approx(0.96, abs=1e-6)


def solve_coefficients(params: list[torch.Tensor], layouts, bands) -> torch.Tensor:
    """[L, ncoef] in float64: S from the parameters by its definition, Q by a solve, gathered by each band layout."""
    rows = []
    for p, layout, band in zip(params, layouts, bands):
        b = layout.block_size
        if layout.mask is not None:
            p = p * layout.mask.double()
        pairs = [(r, c) for r in range(b) for c in range(r + 1, b)]  # S[r, c] = param, S[c, r] = -param
        basis = torch.zeros(len(pairs), b, b, dtype=torch.float64)
        for i, (r, c) in enumerate(pairs):
            basis[i, r, c], basis[i, c, r] = 1.0, -1.0
        skew = torch.einsum("...p,prc->...rc", p, basis)
        eye = torch.eye(b, dtype=torch.float64)
        q = torch.linalg.solve(eye + skew, eye - skew)  # [L, nb, b, b]
        rows.append(q.reshape(p.shape[0], -1)[:, band.index.reshape(-1)] * band.mask.reshape(-1).double())
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize("dim, sizes, mixing, layers", [
    (640, (2, 4, 8), "shift", 3),  # lane forms (AVX-512 / AVX); the benchmark model's layers
    (37, (2, 4, 8), "shift", 2),  # tail blocks (masked skew entries) in every factor
    (50, (3, 16), "none", 1),  # a band form (3 never divides the vector length) and one layer
    (64, (16, 32), "shift", 2),  # a 32-block: band form, larger eliminations
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_match_a_float64_solve(dim, sizes, mixing, layers, dtype):
    layouts = rot.factor_layouts(dim, sizes, mixing)
    bands = rot.kernel_layouts(dim, sizes, mixing, vector_lanes())
    gen = torch.Generator().manual_seed(dim)
    base = [0.3 * torch.randn(layers, lay.num_blocks, rot.num_skew_params(lay.block_size), generator=gen)
            for lay in layouts]
    params = [p.to(dtype).requires_grad_() for p in base]
    params64 = [p.detach().double().requires_grad_() for p in params]  # the same (rounded) values
    got = packed_coefficients(params, layouts, bands)
    want = solve_coefficients(params64, layouts, bands)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got.double(), want, atol=2e-6)
    weights = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (got.double() * weights).sum().backward()
    (want * weights).sum().backward()
    for p, p64, lay in zip(params, params64, layouts):
        assert p.grad.dtype == dtype
        tol = 2e-5 if dtype == torch.float32 else 1e-2 * p64.grad.abs().max().item()
        assert torch.allclose(p.grad.double(), p64.grad, atol=tol), lay.block_size
        if lay.mask is not None:  # masked entries never move
            assert torch.count_nonzero(p.grad[..., lay.mask == 0]) == 0
