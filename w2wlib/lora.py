"""LoRAs as flat vectors, and a batch of them applied to one UNet at once.

weights2weights treats a LoRA as a point ``w`` in ``R^D``. A :class:`LoraLayout` says where each
matrix lives in that vector: for every target Linear it holds ``A`` (peft ``lora_A``, "down",
``[rank, in]``, row-major) and then ``B`` (peft ``lora_B``, "up", ``[out, rank]``). The layer's output
becomes ``base(x) + (alpha / rank) * (x @ A.T) @ B.T``.

The entries follow the order of the keys of a peft adapter file as ``peft.utils.load_peft_weights``
reads them back. That file is safetensors, which stores (and returns) tensors of one dtype sorted
by key, so the order is the sorted order of the keys ``base_model.model.<module>.lora_A.weight`` /
``.lora_B.weight``. For SD 1.5 this is down blocks, mid block, up blocks (w2w's
``weight_dimensions.pt`` order, D = 99,648).

:class:`BatchedLora` applies many LoRAs in one forward pass. It registers a forward hook on each
target Linear (the modules themselves are never replaced, so ``state_dict`` keys do not change).
Inside ``bank.use(W, index)`` the hook adds, for sample ``n`` of the batch, the delta of row
``index[n]`` of ``W`` with two batched matmuls; outside a ``use`` block the hooks add nothing::

    layout = LoraLayout.from_unet(unet)              # rank 1, alpha 27, to_q/to_v
    bank = BatchedLora.attach(unet, layout)
    with bank.use(W):                                # W: [G, D]; sample n uses W[n % G]
        eps = unet(x, t, encoder_hidden_states=c).sample
    bank.detach()

With ``index=None`` sample ``n`` uses row ``n % G``, which is what classifier-free guidance needs:
the pipeline runs ``cat([uncond, cond])`` of size ``2B`` and both halves must use ``W[n % B]``.
With gradient checkpointing, call ``backward()`` inside the ``use`` block (recomputation runs the
hooks again).

Conversions at the edges (peft, diffusers and w2w files) live in :mod:`w2wlib.lora_io`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from w2wlib.errors import LayoutError

__all__ = [
    "LayoutEntry",
    "LoraLayout",
    "BatchedLora",
    "peft_file_order",
    "SD15_UNET_CONFIG",
    "sd15_layout",
]

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LayoutEntry:
    """One target Linear: ``A`` then ``B`` at ``offset`` in the flat vector."""

    module: str
    rank: int
    in_features: int
    out_features: int
    offset: int

    @property
    def a_shape(self) -> tuple[int, int]:
        return (self.rank, self.in_features)

    @property
    def b_shape(self) -> tuple[int, int]:
        return (self.out_features, self.rank)

    @property
    def numel(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    @property
    def a_slice(self) -> slice:
        return slice(self.offset, self.offset + self.rank * self.in_features)

    @property
    def b_slice(self) -> slice:
        return slice(self.offset + self.rank * self.in_features, self.offset + self.numel)


@dataclass(frozen=True)
class LoraLayout:
    """The order and shapes of a flat LoRA vector, plus its ``alpha`` (scale = alpha / rank).

    >>> layout = LoraLayout.from_unet(unet)                 # doctest: +SKIP
    >>> layout.dim, layout.entries[0].module                # doctest: +SKIP
    (99648, 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q')
    """

    entries: tuple[LayoutEntry, ...]
    rank: int
    alpha: float
    target_modules: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "alpha", float(self.alpha))
        offset, seen = 0, set()
        for e in self.entries:
            if e.offset != offset or e.rank != self.rank or e.module in seen:
                raise LayoutError(
                    f"Layout entry {e.module!r} is inconsistent: offset {e.offset} (expected {offset}), "
                    f"rank {e.rank} (layout rank {self.rank}), or a duplicate module."
                )
            seen.add(e.module)
            offset += e.numel

    @property
    def dim(self) -> int:
        """D, the length of a flat vector."""
        return sum(e.numel for e in self.entries)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @cached_property
    def by_module(self) -> dict[str, LayoutEntry]:
        return {e.module: e for e in self.entries}

    def delta_norms(self, W: torch.Tensor) -> torch.Tensor:
        """Frobenius norms ``[N, len(entries)]`` of each module's weight change ``scale * B @ A`` for rows ``W [N, D]``.

        Computed from the ``r x r`` Gram matrices, never forming ``B @ A``:
        ``||B A||_F^2 = trace((B^T B)(A A^T))``.
        """
        W = torch.as_tensor(W)
        if W.ndim != 2 or W.shape[1] != self.dim:
            raise LayoutError(f"W must be [N, {self.dim:,}] for this layout, not {tuple(W.shape)}")
        out = torch.empty(len(W), len(self.entries), dtype=W.dtype)
        for j, e in enumerate(self.entries):
            A = W[:, e.a_slice].reshape(len(W), e.rank, e.in_features)
            B = W[:, e.b_slice].reshape(len(W), e.out_features, e.rank)
            sq = torch.einsum("nij,nji->n", B.transpose(1, 2) @ B, A @ A.transpose(1, 2))
            out[:, j] = self.scale * sq.clamp(min=0).sqrt()
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` inverts it."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "dim": self.dim,
            "entries": [[e.module, e.in_features, e.out_features] for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraLayout":
        layout = cls.from_modules(
            [(m, int(i), int(o)) for m, i, o in d["entries"]],
            rank=int(d["rank"]), alpha=float(d["alpha"]), target_modules=d["target_modules"],
        )
        if "dim" in d and int(d["dim"]) != layout.dim:
            raise LayoutError(f"Layout dict says dim {int(d['dim']):,} but its entries sum to {layout.dim:,}.")
        return layout

    @classmethod
    def from_modules(cls, modules: Iterable[tuple[str, int, int]], rank: int, alpha: float,
                     target_modules: Sequence[str]) -> "LoraLayout":
        """Build a layout from ``(module, in_features, out_features)`` in flat order."""
        entries, offset = [], 0
        for name, fin, fout in modules:
            entries.append(LayoutEntry(name, rank, fin, fout, offset))
            offset += entries[-1].numel
        return cls(tuple(entries), rank, alpha, tuple(target_modules))

    @classmethod
    def from_unet(cls, unet: nn.Module, target_modules: Sequence[str] = ("to_q", "to_v"),
                  rank: int = 1, alpha: float = 27.0) -> "LoraLayout":
        """The layout of a LoRA on every Linear whose last name is in ``target_modules``.

        Only shapes are read, so a UNet built under ``torch.device("meta")`` works.
        """
        found: dict[str, tuple[int, int]] = {}
        for name, mod in unet.named_modules():
            if name.endswith(".base_layer"):  # a peft-wrapped Linear: use the wrapper's path
                name = name[: -len(".base_layer")]
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
                found[name] = (mod.in_features, mod.out_features)
        if not found:
            raise LayoutError(f"No nn.Linear named {list(target_modules)} in this model.")
        order = peft_file_order(found)
        return cls.from_modules([(m, *found[m]) for m in order], rank, alpha, target_modules)


SD15_DIM = 99_648            # rank-1 to_q/to_v LoRA of the SD 1.5 UNet: w2w's layout (tests check sd15_layout().dim)

# Stable Diffusion 1.5's UNet2DConditionModel config (the architecture fields; the rest are diffusers' defaults).
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
)


def sd15_layout(target_modules: Sequence[str] = ("to_q", "to_v"), rank: int = 1, alpha: float = 27.0) -> LoraLayout:
    """The LoRA layout of SD 1.5's UNet without downloading it (built on the meta device): D = 99,648 for w2w's.

    Example:
        >>> sd15_layout().dim
        99648
    """
    return LoraLayout.from_unet(sd15_meta_unet(), target_modules, rank, alpha)


def sd15_meta_unet():
    """SD 1.5's UNet2DConditionModel on the meta device: its module names and shapes, no weights, no download."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


def _peft_key(module: str, ab: str) -> str:
    return f"{PEFT_PREFIX}{module}.lora_{ab}.weight"


def peft_file_order(modules: Iterable[str]) -> list[str]:
    """Modules in the order their keys come back from a saved peft adapter (sorted keys)."""
    keys = sorted(_peft_key(m, ab) for m in modules for ab in "AB")
    order = [k[len(PEFT_PREFIX): -len(".lora_A.weight")] for k in keys[::2]]
    if keys != [_peft_key(m, ab) for m in order for ab in "AB"]:
        raise LayoutError("Module names interleave the A/B keys of another module; no flat layout fits.")
    return order


# --------------------------------------------------------------------------- batched apply


class _EntryHook:
    def __init__(self, bank: "BatchedLora", entry: LayoutEntry):
        self.bank, self.entry = bank, entry

    def __call__(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
        state = self.bank._active
        if state is None:
            return None
        W, index, mult = state
        x, e = inputs[0], self.entry
        n = x.shape[0]
        rows = self.bank._rows(n, W, index)
        a, b = W[:, e.a_slice], W[:, e.b_slice]
        if rows is not None:
            a, b = a.index_select(0, rows), b.index_select(0, rows)
        a = a.to(device=out.device, dtype=out.dtype).reshape(-1, e.rank, e.in_features)
        b = b.to(device=out.device, dtype=out.dtype).reshape(-1, e.out_features, e.rank)
        x3 = x.to(out.dtype).reshape(n, -1, e.in_features)
        if a.shape[0] == 1 and n != 1:  # one LoRA for the whole batch
            delta = (x3 @ a[0].T) @ b[0].T
        else:
            delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))
        return out + (mult * self.bank.layout.scale) * delta.reshape(out.shape)


class BatchedLora:
    """A bank of flat LoRAs applied per sample to a UNet; see the module docstring.

    >>> bank = BatchedLora.attach(unet, layout)              # doctest: +SKIP
    >>> with bank.use(W, index=torch.tensor([0, 4, 4])):     # doctest: +SKIP
    ...     eps = unet(x3, t, encoder_hidden_states=c3).sample
    """

    _ATTR = "_w2w_lora_bank"

    def __init__(self, unet: nn.Module, layout: LoraLayout):
        self.unet, self.layout = unet, layout
        self._handles: list = []
        self._modules: list[nn.Module] = []
        self._stack: list[tuple] = []
        self._rows_cache: dict = {}

    @classmethod
    def attach(cls, unet: nn.Module, layout: LoraLayout) -> "BatchedLora":
        """Hook every Linear of ``layout``; attaching the same layout again returns the same bank."""
        mods = []
        for e in layout.entries:
            try:
                mod = unet.get_submodule(e.module)
            except AttributeError as err:
                raise LayoutError(f"This UNet has no module {e.module!r}: wrong base model?") from err
            if (getattr(mod, "in_features", None), getattr(mod, "out_features", None)) != (
                    e.in_features, e.out_features):
                raise LayoutError(f"Module {e.module!r} is not a Linear {e.in_features}->{e.out_features}.")
            mods.append(mod)
        banks = {id(getattr(m, cls._ATTR, None)): getattr(m, cls._ATTR, None) for m in mods}
        if len(banks) == 1 and (old := next(iter(banks.values()))) is not None and old.layout == layout:
            return old
        if any(b is not None for b in banks.values()):
            raise LayoutError("These modules already carry another LoRA bank; detach it first.")
        bank = cls(unet, layout)
        for e, mod in zip(layout.entries, mods, strict=True):
            bank._handles.append(mod.register_forward_hook(_EntryHook(bank, e)))
            setattr(mod, cls._ATTR, bank)
            bank._modules.append(mod)
        return bank

    @classmethod
    @contextlib.contextmanager
    def attached_to(cls, unet: nn.Module, layout: LoraLayout) -> Iterator["BatchedLora"]:
        """:meth:`attach` for the duration of a ``with`` block: the hooks are removed afterwards unless the
        bank was already attached (then it belongs to the caller and stays)."""
        first = unet.get_submodule(layout.entries[0].module) if layout.entries else None
        had = getattr(first, cls._ATTR, None)
        bank = cls.attach(unet, layout)
        try:
            yield bank
        finally:
            if bank is not had:
                bank.detach()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def _active(self) -> tuple | None:
        return self._stack[-1] if self._stack else None

    def detach(self) -> None:
        """Remove every hook; the UNet is then exactly as before :meth:`attach`."""
        for h in self._handles:
            h.remove()
        for m in self._modules:
            if getattr(m, self._ATTR, None) is self:
                delattr(m, self._ATTR)
        self._handles, self._modules, self._stack = [], [], []

    def check(self, W: torch.Tensor) -> torch.Tensor:
        """``W`` as ``[G, D]``, or a LayoutError naming both widths."""
        if W.dim() == 1:
            W = W.unsqueeze(0)
        if W.dim() != 2 or W.shape[1] != self.layout.dim:
            cols = W.shape[-1] if W.dim() else 0
            raise LayoutError(f"W has {cols:,} columns but this UNet's layout needs {self.layout.dim:,}: "
                              f"wrong base model? (W shape {tuple(W.shape)})")
        return W

    @contextlib.contextmanager
    def use(self, W: torch.Tensor, index: torch.Tensor | Sequence[int] | None = None,
            multiplier: float = 1.0) -> Iterator["BatchedLora"]:
        """Apply row ``index[n]`` of ``W`` (or ``n % G`` when ``index`` is None) to sample ``n``."""
        if not self.attached:
            raise LayoutError("This LoRA bank was detached; attach it again.")
        W = self.check(W)
        if index is not None:
            index = torch.as_tensor(index, dtype=torch.long, device=W.device).reshape(-1)
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= W.shape[0]):
                raise LayoutError(f"index has values outside [0, {W.shape[0]}) (W has {W.shape[0]} rows).")
        self._stack.append((W, index, float(multiplier)))
        try:
            yield self
        finally:
            if self._stack:
                self._stack.pop()

    def _rows(self, n: int, W: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor | None:
        g = W.shape[0]
        if index is not None:
            if index.numel() != n:
                raise LayoutError(f"index has {index.numel()} entries but the UNet batch has {n} samples.")
            return index
        if n % g:
            raise LayoutError(f"The UNet batch has {n} samples, not a multiple of the {g} LoRAs in W; "
                              f"pass index= to say which row each sample uses.")
        if g == n or g == 1:
            return None
        key = (n, g, W.device)
        if key not in self._rows_cache:
            self._rows_cache[key] = torch.arange(n, device=W.device) % g
        return self._rows_cache[key]
