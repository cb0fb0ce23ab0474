"""The rotation maths of ROPO_SPEC.md section 2, checked against independent formulas."""

from __future__ import annotations

import math

import pytest
import torch

from ropo_ray.adapters import rotation as rot


def random_blocks(dim, block_sizes, mixing="shift", scale=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layouts = rot.factor_layouts(dim, block_sizes, mixing)
    params = [scale * torch.randn(lay.num_blocks, rot.num_skew_params(lay.block_size), generator=gen)
              for lay in layouts]
    return [rot.factor_blocks(p, lay) for p, lay in zip(params, layouts)], layouts


def test_skew_is_skew_symmetric_and_places_params_in_upper_triangle():
    params = torch.tensor([[1.0, 2.0, 3.0]])  # b = 3: entries (0,1), (0,2), (1,2)
    s = rot.skew_from_params(params, 3)[0]
    expected = torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [-2.0, -3.0, 0.0]])
    assert torch.equal(s, expected)


def test_cayley_2x2_matches_closed_form():
    """For S = [[0, a], [-a, 0]]: (I+S)^-1 = [[1, -a], [a, 1]] / (1+a^2), and times (I-S) = [[1, -a], [a, 1]]
    gives Q = [[1-a^2, -2a], [2a, 1-a^2]] / (1+a^2); with a = 0.5: [[0.6, -0.8], [0.8, 0.6]]."""
    q = rot.cayley(rot.skew_from_params(torch.tensor([[0.5]]), 2))[0]
    assert torch.allclose(q, torch.tensor([[0.6, -0.8], [0.8, 0.6]]), atol=1e-7)


def test_cayley_equals_inverse_formula_and_is_special_orthogonal():
    s = rot.skew_from_params(torch.randn(5, rot.num_skew_params(6)), 6)
    q = rot.cayley(s)
    eye = torch.eye(6)
    assert torch.allclose(q, (eye - s) @ torch.linalg.inv(eye + s), atol=1e-5)
    assert (q.transpose(-1, -2) @ q - eye).abs().max() < 1e-5
    assert torch.allclose(torch.linalg.det(q), torch.ones(5), atol=1e-5)


@pytest.mark.parametrize("b", [2, 3, 5, 8, 16])
def test_cayley_value_and_gradient_match_float64_solve(b):
    """cayley (Gauss-Jordan without pivoting, and the backward dL/dS = -2 M^T G M^T with M = (I + S)^-1)
    against float64 autograd through torch.linalg.solve, on batched blocks with large entries (pivoting would
    matter for a general matrix; I + S with S skew needs none)."""
    gen = torch.Generator().manual_seed(b)
    params = (3.0 * torch.randn(3, 4, rot.num_skew_params(b), generator=gen)).requires_grad_()
    weights = torch.randn(3, 4, b, b, generator=gen)
    q = rot.cayley(rot.skew_from_params(params, b))
    (q * weights).sum().backward()
    p64 = params.detach().double().requires_grad_()
    s64 = rot.skew_from_params(p64, b)
    eye = torch.eye(b, dtype=torch.float64)
    q64 = torch.linalg.solve(eye + s64, eye - s64)
    (q64 * weights.double()).sum().backward()
    assert q.dtype == torch.float32
    assert (q.double() - q64).abs().max() < 1e-5
    assert torch.allclose(params.grad.double(), p64.grad, rtol=1e-4, atol=1e-5)


def test_zero_params_give_identity():
    blocks, layouts = random_blocks(24, (2, 4, 8), scale=0.0)
    assert torch.equal(rot.rotation_matrix(blocks, layouts, 24), torch.eye(24))


def test_neumann_approaches_exact_cayley():
    """Truncating (I+S)^-1 = sum_k (-S)^k after t terms leaves (-S)^t (I+S)^-1, so the error of Q is
    O(||S||^t): it must shrink with t and stay below 2 ||S||_2^t."""
    torch.manual_seed(0)
    s = rot.skew_from_params(0.05 * torch.randn(4, rot.num_skew_params(8)), 8)
    exact = rot.cayley(s)
    norm = torch.linalg.matrix_norm(s, ord=2).max().item()
    errors = [(rot.cayley_neumann(s, t) - exact).abs().max().item() for t in (2, 4, 6)]
    assert errors[0] > errors[1] > errors[2]
    for t, err in zip((2, 4, 6), errors):
        assert err <= 2 * norm**t


@pytest.mark.parametrize("mixing", ["shift", "stride", "none"])
def test_rotation_is_orthogonal_fp32(mixing):
    blocks, layouts = random_blocks(40, (2, 4, 8), mixing)
    r = rot.rotation_matrix(blocks, layouts, 40)
    assert (r.T @ r - torch.eye(40)).abs().max() < 1e-5


def test_rotation_is_orthogonal_bf16_within_stated_bound():
    """bf16 keeps 8 significant bits (eps 2^-8 ~ 3.9e-3); three factors compound it. Bound: 3e-2."""
    blocks, layouts = random_blocks(64, (2, 4, 8))
    x = torch.eye(64, dtype=torch.bfloat16)
    r = rot.apply_rotation(x, [q.to(torch.bfloat16) for q in blocks], layouts).float()
    err = (r.T @ r - torch.eye(64)).abs().max().item()
    assert 0 < err < 3e-2


def test_factor_matches_dense_permutation_formula():
    """apply_factor(x) == x @ P^T blockdiag(Q) P with P[i, perm[i]] = 1, built densely."""
    dim, b = 12, 4
    blocks, layouts = random_blocks(dim, (2, b), "shift")
    lay, q = layouts[1], blocks[1]
    p = torch.zeros(dim, dim)
    p[torch.arange(dim), lay.perm] = 1.0
    dense = p.T @ torch.block_diag(*q) @ p
    x = torch.randn(3, dim)
    assert torch.allclose(rot.apply_factor(x, q, lay), x @ dense, atol=1e-6)
    assert torch.allclose(rot.apply_factor(x, q, lay, transpose=True), x @ dense.T, atol=1e-6)


def test_inverse_undoes_rotation():
    blocks, layouts = random_blocks(20, (2, 4, 8))
    x = torch.randn(5, 20)
    back = rot.apply_rotation(rot.apply_rotation(x, blocks, layouts), blocks, layouts, inverse=True)
    assert torch.allclose(back, x, atol=1e-5)


def _cross_block_mass(r: torch.Tensor, b: int) -> float:
    """Sum of |R_ij| over entries outside the aligned b-blocks of the diagonal."""
    idx = torch.arange(r.shape[0]) // b
    outside = idx[:, None] != idx[None, :]
    return r.abs()[outside].sum().item()


def test_aligned_nested_blocks_do_not_mix_beyond_largest_block():
    """The trap of section 2: with mixing=none, (2, 4, 8) is still block-diagonal at size 8."""
    blocks, layouts = random_blocks(32, (2, 4, 8), "none")
    assert _cross_block_mass(rot.rotation_matrix(blocks, layouts, 32), 8) == 0.0


@pytest.mark.parametrize("mixing", ["shift", "stride"])
def test_mixing_permutation_mixes_across_largest_block_boundary(mixing):
    blocks, layouts = random_blocks(32, (2, 4, 8), mixing)
    r = rot.rotation_matrix(blocks, layouts, 32)
    assert _cross_block_mass(r, 8) > 1.0


def test_shift_mixing_joins_neighbouring_largest_blocks():
    """With shift, the 8-block of the last factor covers dimensions 4..11: 7 and 8 are joined."""
    blocks, layouts = random_blocks(32, (2, 4, 8), "shift")
    r = rot.rotation_matrix(blocks, layouts, 32)
    assert abs(r[7, 8].item()) > 1e-4 and abs(r[8, 7].item()) > 1e-4


def test_tail_block_stays_orthogonal_and_counts_its_free_params():
    """d = 10, b = 4: blocks [0..3], [4..7], tail [8, 9] (r = 2): 6 + 6 + 1 = 13 free params."""
    layouts = rot.factor_layouts(10, (4,), "shift")
    assert layouts[0].num_blocks == 3 and layouts[0].num_free_params == 13
    blocks, layouts = random_blocks(10, (4,))
    r = rot.rotation_matrix(blocks, layouts, 10)
    assert (r.T @ r - torch.eye(10)).abs().max() < 1e-5
    assert r[8:, 8:].abs().sum() > 0 and r[8:, :8].abs().sum() == 0  # tail rotates only within itself


def test_block_size_larger_than_dim_is_an_error():
    with pytest.raises(ValueError, match="larger than the layer's input dimension 6"):
        rot.factor_layouts(6, (8,), "shift")


def test_merge_weight_equals_dense_formula():
    """W' = diag(s) W R^T with the dense R."""
    blocks, layouts = random_blocks(16, (2, 4))
    w, s = torch.randn(6, 16), torch.rand(6) + 0.5
    r = rot.rotation_matrix(blocks, layouts, 16)
    assert torch.allclose(rot.merge_weight(w, s, blocks, layouts), s[:, None] * (w @ r.T), atol=1e-5)


def test_num_skew_params():
    assert [rot.num_skew_params(b) for b in (2, 4, 8)] == [1, 6, 28]
    assert rot.factor_layouts(4096, (8,), "shift")[0].num_params == 512 * 28 == math.comb(8, 2) * 512
