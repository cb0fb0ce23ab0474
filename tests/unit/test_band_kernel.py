"""The native band kernel (adapters/kernels/band_chain.c) against dense float64 formulas built here.

The dense rotation is assembled from its definition, R = prod_k P_k^T blockdiag(Q_k) P_k, with explicit
permutation matrices, never through the code under test; values and gradients come from float64 autograd
on that matrix.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ropo_ray.adapters import native
from ropo_ray.adapters import rotation as rot
from ropo_ray.adapters.inject import inject_ropo
from ropo_ray.adapters.ropo_linear import RoPOLinear
from ropo_ray.config.schema import AdapterConfig


def dense_factor(q: torch.Tensor, layout: rot.FactorLayout, dim: int) -> torch.Tensor:
    """x @ F for row vectors: F = P^T blockdiag(Q)[:d, :d] P with P[i, perm[i]] = 1 (identity perm: P = I)."""
    p = torch.eye(dim, dtype=q.dtype)
    if layout.perm is not None:
        p = torch.zeros(dim, dim, dtype=q.dtype)
        p[torch.arange(dim), layout.perm] = 1.0
    return p.T @ torch.block_diag(*q)[:dim, :dim] @ p


def params_for(dim, block_sizes, mixing, seed=0, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    layouts = rot.factor_layouts(dim, block_sizes, mixing)
    params = [(scale * torch.randn(lay.num_blocks, rot.num_skew_params(lay.block_size), generator=gen))
              .requires_grad_() for lay in layouts]
    return params, layouts


CASES = [  # dim, block sizes, mixing, rows: tails of every loop (d % 16, d % b, rows % 4) are covered
    (64, (2, 4, 8), "shift", 8),
    (37, (2, 4, 8), "shift", 7),  # 37 = 4 * 8 + 5: a tail block in every factor after the first
    (30, (4, 8), "none", 5),
    (15, (2, 4), "shift", 3),  # shorter than one vector: scalar loops only
    (100, (2, 4, 8, 16), "shift", 9),
    (100, (4, 32, 2), "shift", 6),  # with lanes, 32 (wider than any vector) stays a band between lane factors
]


def kernel_bands(dim, layouts, form):
    """Every factor in the band form ("band"), or in the lane form where the built kernel's vector length
    allows ("lanes": the layer's choice)."""
    lanes = native.vector_lanes() if form == "lanes" else 0
    return [rot.band_layout(dim, lay, lanes) for lay in layouts]


@pytest.mark.parametrize("form", ["band", "lanes"])
@pytest.mark.parametrize(("dim", "block_sizes", "mixing", "rows"), CASES)
def test_kernel_value_and_gradients_match_dense_float64(dim, block_sizes, mixing, rows, form):
    params, layouts = params_for(dim, block_sizes, mixing)
    bands = kernel_bands(dim, layouts, form)
    assert all(band is not None for band in bands)
    assert [bool(band.lanes) for band in bands] == [
        form == "lanes" and native.vector_lanes() % b == 0 for b in block_sizes]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, rows, dim, generator=gen, requires_grad=True)
    weights = torch.randn(2, rows, dim, generator=gen)

    y = rot.apply_rotation_banded(x, [rot.factor_blocks(p, lay) for p, lay in zip(params, layouts)], bands)
    (y * weights).sum().backward()
    got = [x.grad.clone(), *(p.grad.clone() for p in params)]

    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    dense = torch.eye(dim, dtype=torch.float64)
    for p, lay in zip(p64, layouts):
        skew = rot.skew_from_params(p * (1 if lay.mask is None else lay.mask.double()), lay.block_size)
        eye = torch.eye(lay.block_size, dtype=torch.float64)
        dense = dense @ dense_factor(torch.linalg.solve(eye + skew, eye - skew), lay, dim)
    y64 = x64 @ dense
    (y64 * weights.double()).sum().backward()
    want = [x64.grad, *(p.grad for p in p64)]

    assert torch.allclose(y.double(), y64, atol=2e-6)
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


@pytest.mark.parametrize("form", ["band", "lanes"])
def test_bfloat16_rows_round_once(form):
    """bf16 in, bf16 out: the result is the float32 result rounded to bf16 (to within one bf16 step)."""
    params, layouts = params_for(64, (2, 4, 8), "shift")
    bands = kernel_bands(64, layouts, form)
    blocks = [rot.factor_blocks(p, lay).detach() for p, lay in zip(params, layouts)]
    x = torch.randn(9, 64).bfloat16()
    y = rot.apply_rotation_banded(x, blocks, bands)
    exact = rot.apply_rotation(x.float(), blocks, layouts)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()


def test_stride_mixing_is_not_a_band_and_shift_is():
    assert rot.band_layout(64, rot.factor_layouts(64, (2, 8), "stride")[1]) is None
    assert rot.band_layout(64, rot.factor_layouts(64, (2, 8), "stride")[1], lanes=16) is None
    band = rot.band_layout(64, rot.factor_layouts(64, (2, 8), "shift")[1])
    assert band is not None and band.width == 7 and band.lanes == 0
    # Each column holds exactly its block's 8 coefficients (block-mates within distance 7, wrapping round).
    assert torch.equal(band.mask.sum(0), torch.full((64,), 8.0))


def test_lane_form_coefficients_by_hand():
    """d = 6, one factor of b = 4 shifted by 2, 8 lanes: stream position k is coordinate (2 + k) mod 6, blocks
    {2, 3, 4, 5} and the tail {0, 1} (size 2 of 4), the stream padded to 8. c[s, k] = Q_j[(r + s) mod 4, r]."""
    layout = rot.factor_layouts(6, (2, 4), "shift")[1]
    band = rot.band_layout(6, layout, lanes=8)
    assert (band.lanes, band.offset, tuple(band.index.shape)) == (4, 2, (4, 8))
    q = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 4, 4)  # block j's entry (row, col) = 16 j + 4 row + col
    c = rot.band_coefficients(q, band)
    assert c[0].tolist() == [0, 5, 10, 15, 16, 21, 0, 0]  # the diagonals; the tail's padding and k >= 6 are zero
    assert c[1].tolist() == [4, 9, 14, 3, 20, 0, 0, 0]  # row (r + 1) mod 4: block 1's row 2 lies past its size
    assert c[3].tolist() == [12, 1, 6, 11, 0, 17, 0, 0]


def test_layers_of_one_shape_share_their_kernel_layouts():
    a = RoPOLinear(nn.Linear(64, 8), (2, 4, 8), "shift", kernel="native")
    b = RoPOLinear(nn.Linear(64, 32), (2, 4, 8), "shift", kernel="native")
    c = RoPOLinear(nn.Linear(48, 8), (2, 4, 8), "shift", kernel="native")
    assert a._bands is b._bands and a._layouts is b._layouts
    assert c._bands is not a._bands


def test_layer_kernel_setting():
    base = nn.Linear(32, 6)
    assert RoPOLinear(base, (2, 4), "shift", kernel="native").uses_native_kernel
    assert not RoPOLinear(base, (2, 4), "shift", kernel="torch").uses_native_kernel
    assert not RoPOLinear(base, (2, 4), "stride", kernel="auto").uses_native_kernel
    with pytest.raises(ValueError, match="adapter.kernel=native needs banded factors"):
        RoPOLinear(base, (2, 4), "stride", kernel="native")


def test_native_and_torch_layers_agree_in_a_model(tiny_llama):
    """The same adapted Llama, native kernel vs torch block matmuls: logits and every gradient."""
    import copy

    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4], [3, 3, 8, 1, 0, 6, 12, 9]])
    models = {}
    for kernel in ("native", "torch"):
        model = copy.deepcopy(tiny_llama)
        inject_ropo(model, AdapterConfig(kernel=kernel, target_modules=("q_proj", "v_proj", "down_proj")))
        torch.manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.dim() == 2:
                    p.normal_(0, 0.3)
        model(ids).logits.square().mean().backward()
        models[kernel] = model
    native_params = dict(models["native"].named_parameters())
    for name, p in models["torch"].named_parameters():
        if p.requires_grad:
            assert torch.allclose(native_params[name].grad, p.grad, rtol=1e-4, atol=1e-6), name


def test_auto_falls_back_with_a_warning_when_the_compiler_is_missing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ROPO_RAY_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    native.library.cache_clear()
    try:
        ok, why = native.available()
        assert not ok and "no-such-compiler-here" in why
        with pytest.raises(native.KernelUnavailable, match="adapter.kernel=native"):
            RoPOLinear(nn.Linear(16, 4), (2, 4), "shift", kernel="native")
        model = nn.Sequential()
        model.add_module("q_proj", nn.Linear(16, 4))
        with caplog.at_level(logging.WARNING):
            inject_ropo(model, AdapterConfig(block_sizes=(2, 4), target_modules=("q_proj",)))
        assert "torch block matmuls" in caplog.text and "no-such-compiler-here" in caplog.text
    finally:
        native.library.cache_clear()


def test_build_failure_names_the_compiler_error(tmp_path, monkeypatch):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'fakecc: error: out of luck' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("ROPO_RAY_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fake))
    native.library.cache_clear()
    try:
        with pytest.raises(native.KernelUnavailable, match="out of luck"):
            native.library()
        assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built is published
    finally:
        native.library.cache_clear()


def test_library_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("ROPO_RAY_KERNEL_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        native.library()
        built = list(tmp_path.glob("band_chain-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        native.library()  # a second process (a fresh cache) loads the file, it does not rebuild
        assert built[0].stat().st_mtime_ns == stamp
    finally:
        native.library.cache_clear()


def dense_rotation64(params, layouts, dim):
    dense = torch.eye(dim, dtype=torch.float64)
    for p, lay in zip(params, layouts):
        skew = rot.skew_from_params(p * (1 if lay.mask is None else lay.mask.double()), lay.block_size)
        eye = torch.eye(lay.block_size, dtype=torch.float64)
        dense = dense @ dense_factor(torch.linalg.solve(eye + skew, eye - skew), lay, dim)
    return dense


def adapted_layer(dim, out, bias, block_sizes=(2, 4, 8), seed=0):
    """A RoPOLinear with random rotation parameters and magnitudes away from their initial c."""
    torch.manual_seed(seed)
    layer = RoPOLinear(nn.Linear(dim, out, bias=bias), block_sizes, "shift", kernel="native")
    with torch.no_grad():
        for p in layer.rotation:
            p.normal_(0, 0.4)
        layer.magnitude.mul_(0.5 + torch.rand(out))
        if bias:
            layer.base.bias.normal_()
    return layer


def layer_against_dense64(layer, x, weights):
    """(values, [grad x, grad m, grad of each factor's parameters]) of the layer and of the dense float64
    formula y = (m / c) * (W R^T x) + b, R assembled from its definition, c the row norms of W."""
    y = layer(x)
    (y * weights).sum().backward()
    got = [x.grad.clone(), layer.magnitude.grad.clone(), *(p.grad.clone() for p in layer.rotation)]
    w64 = layer.base.weight.detach().double()
    x64 = x.detach().double().requires_grad_()
    m64 = layer.magnitude.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in layer.rotation]
    y64 = (x64 @ dense_rotation64(p64, layer._layouts, layer.in_features)) @ w64.T * (m64 / w64.norm(dim=1))
    if layer.base.bias is not None:
        y64 = y64 + layer.base.bias.detach().double()
    (y64 * weights.double()).sum().backward()
    return (y, got), (y64, [x64.grad, m64.grad, *(p.grad for p in p64)])


@pytest.mark.parametrize(("dim", "out", "bias", "rows"), [(64, 24, False, 8), (37, 29, True, 7), (40, 9, False, 3)])
def test_fused_layer_value_and_gradients_match_dense_float64(dim, out, bias, rows):
    """The fused CPU layer (fused.py: band kernel, matmul, in-place scale, one-pass scale backward) against
    float64 autograd on the dense formula; the tails of the scale pass's vector loop are covered (out % 8)."""
    layer = adapted_layer(dim, out, bias)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, rows, dim, generator=gen, requires_grad=True)
    weights = torch.randn(2, rows, out, generator=gen)
    (y, got), (y64, want) = layer_against_dense64(layer, x, weights)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_RotatedLinearBackward"
    assert torch.allclose(y.double(), y64, atol=1e-5)
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_zero_magnitude_keeps_u_and_its_gradient_is_right(dtype):
    """The fused backward recovers u = (y - b) / s from the output, which a zero m makes impossible: the layer
    then keeps u itself, and the gradient of that m is still sum_t g * u (nonzero), not a 0/0."""
    layer = adapted_layer(32, 8, bias=True).to(dtype)
    with torch.no_grad():
        layer.magnitude[3] = 0.0
    x = torch.randn(5, 32).to(dtype).requires_grad_()
    weights = torch.randn(5, 8).to(dtype)
    (y, got), (y64, want) = layer_against_dense64(layer, x, weights)
    assert type(y.grad_fn).__name__ == "_RotatedLinearBackward"
    assert want[1][3].abs() > 1e-3 and torch.isfinite(got[1]).all()
    tol = 1e-4 if dtype == torch.float32 else 2 ** -5
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w, rtol=tol, atol=tol * w.abs().max().item())


@pytest.mark.parametrize("bias", [False, True])
def test_fused_layer_in_bfloat16_stays_within_bf16_rounding(bias):
    """bf16 weights and activations (DeepSpeed's bf16 mode): values and gradients within a few bf16 steps of
    the float64 formula on the same (bf16-rounded) inputs; with a bias, scale and bias in one rounded pass."""
    layer = adapted_layer(64, 40, bias=bias).bfloat16()
    x = torch.randn(6, 64).bfloat16().requires_grad_()
    weights = torch.randn(6, 40).bfloat16()
    (y, got), (y64, want) = layer_against_dense64(layer, x, weights)
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ == "_RotatedLinearBackward"
    assert ((y.double() - y64).abs() <= 2 ** -6 * y64.abs().max()).all()
    for g, w in zip(got, want):
        assert ((g.double() - w).abs() <= 2 ** -5 * w.abs().max()).all()


def test_changing_the_fused_output_in_place_fails_loudly():
    """The fused layer keeps its output for the backward: a model that edits it in place must get autograd's
    error at that edit, not a wrong magnitude gradient."""
    layer = adapted_layer(32, 8, bias=False)
    y = layer(torch.randn(4, 32, requires_grad=True))
    with pytest.raises(RuntimeError, match="modified inplace"):
        y.mul_(2.0)


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
def test_kernel_built_for_other_vector_widths_matches_dense(march, tmp_path, monkeypatch):
    """The kernel's vector width follows the target (4 floats for SSE, 8 for AVX2, 16 for AVX-512): built for
    SSE-only and AVX2 x86-64 it still matches the float64 formula in both forms (with 4 lanes the block of 8
    stays a band beside lane factors of 2 and 4), and the fused layer does too."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 -march levels")
    monkeypatch.setenv("ROPO_RAY_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("ROPO_RAY_KERNEL_MARCH", march)
    native.library.cache_clear()
    try:
        assert native.vector_lanes() == {"x86-64": 4, "x86-64-v3": 8}[march]
        for form in ("band", "lanes"):
            test_kernel_value_and_gradients_match_dense_float64(37, (2, 4, 8), "shift", 7, form)
        test_fused_layer_value_and_gradients_match_dense_float64(37, 29, True, 7)
        assert len(list(tmp_path.glob("band_chain-*.so"))) == 1
    finally:
        native.library.cache_clear()
