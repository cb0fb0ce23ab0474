"""The RoPO layer: a frozen `nn.Linear` turned by a learned rotation and scaled by a learned magnitude.

    y = (m / c) * (W (R^T x)) + bias        (ROPO_SPEC.md section 1; arXiv 2508.17637)

W, bias frozen; c = row norms of W (fp32, computed once); m initialised to c and R to I, so the
layer equals the base layer exactly at step 0. During training R is applied to the activations, never
materialised as W R^T: on the CPU with banded mixing by the native band kernel (`kernel`: auto or
native; see rotation.py and kernels/band_chain.c), there with the matmul and the scale in one autograd
function (fused.py); otherwise as batched small block matmuls (`torch`, also the GPU path).
`merged_linear` folds it back for export.
"""

from __future__ import annotations

import torch
from torch import nn

from ropo_ray.adapters import native
from ropo_ray.adapters.cayley import num_skew_params
from ropo_ray.adapters.coefficients import packed_coefficients
from ropo_ray.adapters.fused import rotated_linear
from ropo_ray.adapters.rotation import (
    BandLayout,
    FactorLayout,
    Mixing,
    apply_rotation,
    apply_rotation_banded,
    band_coefficients,
    factor_blocks,
    kernel_layouts,
    merge_weight,
    orthogonality_error,
    pack_coefficients,
    shared_factor_layouts,
)


class RoPOLinear(nn.Module):
    """Wraps a frozen linear layer; trains only `rotation` (skew params per factor) and `magnitude`."""

    def __init__(
        self,
        base: nn.Linear,
        block_sizes: tuple[int, ...] = (2, 4, 8),
        mixing: Mixing = "shift",
        cayley: str = "exact",
        neumann_terms: int = 5,
        learn_magnitude: bool = True,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        out_features, in_features = base.weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.block_sizes = tuple(block_sizes)
        self.mixing = mixing
        self.cayley = cayley
        self.neumann_terms = neumann_terms
        self._layouts = shared_factor_layouts(in_features, self.block_sizes, mixing)
        self._layouts_by_device: dict[torch.device, list[FactorLayout]] = {}
        self.kernel = kernel
        self._bands = self._band_layouts(kernel)
        weight = base.weight.detach()
        norms = weight.float().norm(dim=1)  # [n]
        # c is derived from the frozen W, so it is not saved with the adapter weights.
        self.register_buffer("row_norms", norms, persistent=False)
        self.magnitude = nn.Parameter(norms.clone(), requires_grad=learn_magnitude)
        self.disabled = False  # True: compute the frozen base alone (the reference policy; see train/probe.py)
        self._shared: tuple[torch.Tensor, tuple[int, ...]] | None = None  # share_rotations' result, versions
        self.fuse = True  # False: the composed ops even where fused.py applies (for tests and benchmarks)
        self.rotation = nn.ParameterList(
            nn.Parameter(torch.zeros(lay.num_blocks, num_skew_params(lay.block_size), device=weight.device))
            for lay in self._layouts
        )

    def _band_layouts(self, kernel: str) -> list[BandLayout] | None:
        """The factors' band layouts when the native kernel is to be used on CPU inputs, else None."""
        if kernel == "torch":
            return None
        if kernel not in ("auto", "native"):
            raise ValueError(f"adapter.kernel={kernel!r}: expected auto, native or torch")
        ok, why = native.available()
        lanes = native.vector_lanes() if ok else 0
        bands = kernel_layouts(self.in_features, self.block_sizes, self.mixing, lanes)
        if any(band is None for band in bands):
            if kernel == "native":
                raise ValueError(f"adapter.kernel=native needs banded factors (mixing shift or none, input "
                                 f"dimension >= 2 * block size - 1); mixing={self.mixing!r}, "
                                 f"block_sizes={self.block_sizes}, in_features={self.in_features}")
            return None
        if not ok:
            if kernel == "native":
                raise native.KernelUnavailable(f"adapter.kernel=native: {why}")
            return None
        return bands

    @property
    def uses_native_kernel(self) -> bool:
        """True when CPU float32/bfloat16 inputs go through the native band kernel."""
        return self._bands is not None

    def layouts(self, device: torch.device) -> list[FactorLayout]:
        """The factor layouts with their index tensors on `device` (cached per device)."""
        if device.type == "cpu":
            return self._layouts
        if device not in self._layouts_by_device:
            self._layouts_by_device[device] = [
                FactorLayout(
                    lay.block_size, lay.num_blocks,
                    None if lay.perm is None else lay.perm.to(device),
                    None if lay.inv_perm is None else lay.inv_perm.to(device),
                    None if lay.mask is None else lay.mask.to(device),
                )
                for lay in self._layouts
            ]
        return self._layouts_by_device[device]

    def blocks(self) -> list[torch.Tensor]:
        """Orthogonal blocks [nb, b, b] of every factor, computed once per forward (fp32)."""
        layouts = self.layouts(self.rotation[0].device)
        return [factor_blocks(p, lay, self.cayley, self.neumann_terms) for p, lay in zip(self.rotation, layouts)]

    def scale(self) -> torch.Tensor:
        """m / c, per output neuron [n] (fp32)."""
        return self.magnitude.float() / self.row_norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        banded = self._bands is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
        if banded and self._fusable(x):
            return rotated_linear(x, self.base.weight, self.base.bias, self.magnitude, self.row_norms,
                                  self.coefficients(), self._bands)  # one pass fewer over the output each way
        if banded:
            x_rot = apply_rotation_banded(x, self.blocks(), self._bands)  # [..., d] = x @ R
        else:
            x_rot = apply_rotation(x, self.blocks(), self.layouts(x.device))
        # Call the base module (not F.linear on its weight) so ZeRO-3 gathers its sharded weight.
        y = self.base(x_rot)  # [..., n] = W R^T x + b
        s = self.scale().to(y.dtype)
        if self.base.bias is None:
            return y * s
        return y * s + (1 - s) * self.base.bias  # = s * (W R^T x) + b

    def coefficients(self) -> torch.Tensor:
        """The kernel's packed coefficients of R: those `share_rotations` computed for this model forward when
        they still match the parameters, else computed here."""
        shared = self._shared
        if shared is not None and shared[1] == self._versions() and (shared[0].requires_grad or not (
                torch.is_grad_enabled() and any(p.requires_grad for p in self.rotation))):
            return shared[0]
        return self._packed([p[None] for p in self.rotation])[0]

    def _packed(self, params: list[torch.Tensor]) -> torch.Tensor:
        """[L, ncoef]: the kernel's packed coefficients of L layers of this layer's layouts and method, from each
        factor's parameters stacked over them ([L, nb, b(b-1)/2]); exact Cayley natively (coefficients.py), the
        Neumann approximation by the composed ops."""
        if self.cayley == "exact":
            return packed_coefficients(params, self._layouts, self._bands)
        return pack_coefficients([band_coefficients(factor_blocks(p, layout, self.cayley, self.neumann_terms), band)
                                  for p, layout, band in zip(params, self._layouts, self._bands)],
                                 layers=params[0].shape[0])

    def _versions(self) -> tuple[int, ...]:
        """The rotation parameters' version counters (an in-place update, e.g. an optimizer step, bumps them)."""
        return tuple(p._version for p in self.rotation._parameters.values())  # not ParameterList's slower iterator

    def _shareable(self) -> tuple | None:
        """The key of layers whose coefficients one batched computation gives (same layouts, method and
        parameter dtype and device), or None when this layer computes its own: no native kernel, parameters
        off the CPU (the kernel serves CPU inputs only), or partitioned by ZeRO-3 (gathered only inside the
        layer's own forward)."""
        first = self.rotation[0]
        if (self._bands is None or self.disabled or first.device.type != "cpu"
                or any(hasattr(p, "ds_id") for p in self.rotation)):
            return None
        return (self.in_features, self.block_sizes, self.mixing, self.cayley, self.neumann_terms, first.dtype,
                first.device, id(self._bands))

    def _fusable(self, x: torch.Tensor) -> bool:
        """The fused CPU function applies: `fuse` is on and the weight is a plain CPU tensor of x's dtype (a
        ZeRO-3 partition is gathered only when the base module is called)."""
        weight = self.base.weight
        return self.fuse and not hasattr(weight, "ds_id") and weight.device.type == "cpu" and weight.dtype == x.dtype

    def merged_weight(self) -> torch.Tensor:
        """W' = diag(m / c) W R^T in the base weight's dtype."""
        return merge_weight(self.base.weight.detach(), self.scale().detach(), [q.detach() for q in self.blocks()],
                            self.layouts(self.base.weight.device))

    def merged_linear(self) -> nn.Linear:
        """A plain `nn.Linear` computing this layer (for export and sampling)."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.merged_weight())
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        merged.requires_grad_(False)
        return merged

    def orthogonality_error(self) -> float:
        """max ||Q^T Q - I|| over this layer's blocks (0 up to rounding with exact Cayley)."""
        with torch.no_grad():
            return orthogonality_error(self.blocks())

    def num_free_params(self) -> int:
        """Trainable parameters that change the layer (masked tail-block entries excluded)."""
        rot = sum(lay.num_free_params for lay in self._layouts)
        return rot + (self.out_features if self.magnitude.requires_grad else 0)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, block_sizes={self.block_sizes}, "
                f"mixing={self.mixing}, cayley={self.cayley}, kernel={'native' if self._bands else 'torch'}")


def share_rotations(layers: list[RoPOLinear]) -> None:
    """Compute the kernel coefficients of many layers at once, one batched computation per group of layers with
    the same layouts (`_shareable`), and hand each layer its row (`RoPOLinear.coefficients`).

    A layer's rotation parameters go through ~30 small tensor ops (skew matrices, Cayley eliminations, gathers) and
    as many in the backward, a cost per layer and step that does not shrink with the batch; stacked, a group
    pays it once, and with exact Cayley in one native call per factor each way (coefficients.py). Gradients
    reach each layer's parameters through the stack.

    The coefficients serve one model forward, and the recomputation of its checkpointed layers in the backward
    (which must see the very tensors the forward used). A group's coefficients are dropped when their gradient
    arrives (the backward has then passed every layer and frees their graph), or after the forward when they
    carry no graph (`release_untracked`); a layer whose parameters changed since computes its own.
    """
    groups: dict[tuple, list[RoPOLinear]] = {}
    for layer in layers:
        key = layer._shareable()
        if key is not None:
            groups.setdefault(key, []).append(layer)
    for group in groups.values():
        if len(group) < 2:
            continue
        first = group[0]
        packed = first._packed([torch.stack([layer.rotation[f] for layer in group])
                                for f in range(len(first._bands))])  # [L, ncoef]
        if packed.requires_grad:
            packed.register_hook(lambda _grad, group=group: release(group))
        for layer, row in zip(group, packed.unbind(0)):
            layer._shared = (row, layer._versions())


def release(layers: list[RoPOLinear]) -> None:
    """Drop the layers' shared coefficients."""
    for layer in layers:
        layer._shared = None


def release_untracked(layers: list[RoPOLinear]) -> None:
    """After a model forward: drop shared coefficients that carry no graph (no backward will come for them)."""
    release([layer for layer in layers if layer._shared is not None and not layer._shared[0].requires_grad])
