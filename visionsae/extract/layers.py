"""Which activations to keep: layer names -> hooked modules, and which token rows of each.

Layer names on the command line: a block index (``6``, ``-1``; negative counts from the end),
``block_N`` (transformers), ``stage_N`` (CNNs: an index into the model's stage sequence, whose
spatial positions are the tokens), or ``embedding`` (the final image embedding; always one row per
image). Store group names are resolved and non-negative: ``block_11``, ``stage_3``, ``embedding``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import torch

from visionsae.errors import UserError
from visionsae.extract.backbones import Backbone
from visionsae.store import LayerSpec

TOKENS = ("cls", "patches", "mean", "all")
_INDEX = re.compile(r"^(block_|stage_)?(-?\d+)$")


@dataclasses.dataclass(frozen=True)
class Tap:
    name: str  # store group name
    source: str  # module path in the backbone
    kind: str  # residual | stage | embedding
    token_kind: str  # cls | patches | mean | all | spatial | embedding
    block: int | None  # index into backbone.blocks (None for the embedding)


def default_layers(bb: Backbone) -> tuple[str, ...]:
    """Last block of a transformer (its residual stream); the pooled embedding of a CNN."""
    return ("-1",) if bb.is_transformer else ("embedding",)


def default_tokens(bb: Backbone) -> str:
    return "cls" if bb.has_class_token else "mean"


def resolve_layers(bb: Backbone, requested: Sequence[str] | None, tokens: str) -> list[Tap]:
    """Parse layer names, check them against the backbone, and fix each layer's token rows."""
    if tokens not in TOKENS:
        raise UserError(f"unknown --tokens '{tokens}': choose one of {', '.join(TOKENS)}")
    n = len(bb.blocks)
    unit = "block" if bb.is_transformer else "stage"
    taps: list[Tap] = []
    for item in requested or default_layers(bb):
        item = item.strip().lower()
        if item == "embedding":
            tap = Tap("embedding", bb.embed_source, "embedding", "embedding", None)
        else:
            m = _INDEX.match(item)
            if not m:
                raise UserError(f"unknown layer '{item}': use a {unit} index (e.g. -1), {unit}_N, or embedding")
            if m.group(1) and m.group(1) != unit + "_":
                raise UserError(f"layer '{item}': {bb.id} has {unit}s, not {m.group(1)[:-1]}s; "
                                f"use {unit}_N or a plain index")
            i = int(m.group(2))
            if not -n <= i < n:
                raise UserError(f"layer '{item}' is out of range for {bb.id}: it has {n} {unit}s, "
                                f"valid indices {0}..{n - 1} (or {-n}..-1), or embedding")
            i %= n
            tap = Tap(f"{unit}_{i}", bb.blocks[i][0], "residual" if bb.is_transformer else "stage",
                      _token_kind(bb, tokens), i)
        if tap.name not in {t.name for t in taps}:  # "11,-1" name the same layer once
            taps.append(tap)
    return taps


def _token_kind(bb: Backbone, tokens: str) -> str:
    if bb.is_transformer:
        if tokens in ("cls", "all") and not bb.has_class_token:
            raise UserError(f"{bb.id} has no class token: use --tokens mean or patches")
        return tokens
    if tokens == "cls":
        raise UserError(f"{bb.id} is a CNN: its stages have no class token; use --tokens mean (spatial mean) "
                        "or patches (every spatial position), or --layers embedding")
    return "mean" if tokens == "mean" else "spatial"


class _Stop(Exception):
    """Raised by the deepest hook when nothing after it is needed: the rest of the network is skipped."""


class Capture:
    """Run the backbone once per batch and return the kept rows of every tap as [B, T, d], in the backbone's
    dtype (float32, or bf16 under autocast; means in float32)."""

    def __init__(self, bb: Backbone, taps: Sequence[Tap]):
        self.bb, self.taps = bb, list(taps)
        self._need_embedding = any(t.kind == "embedding" for t in self.taps)
        blocks = [t for t in self.taps if t.block is not None]
        last = max((t.block for t in blocks), default=None)
        self._out: dict[str, torch.Tensor] = {}
        self._handles = []
        for tap in blocks:
            stop = not self._need_embedding and tap.block == last
            self._handles.append(bb.blocks[tap.block][1].register_forward_hook(self._hook(tap, stop)))

    def _hook(self, tap: Tap, stop: bool):
        def hook(_module, _inputs, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            self._out[tap.name] = self._select(tap, h)
            if stop:
                raise _Stop
        return hook

    def _select(self, tap: Tap, h: torch.Tensor) -> torch.Tensor:
        bb = self.bb
        if bb.is_transformer:
            h_BLD = h.transpose(0, 1) if bb.seq_first else h
            patches_BPD = h_BLD[:, bb.n_prefix_tokens:]  # register tokens sit between class and patches
            # Rows keep the backbone's dtype (bf16 under autocast): the store's buffer casts them once, and
            # float32 -> float16 of a bf16 value rounds as bf16 -> float16 does. Only means are taken in float32.
            if tap.token_kind == "cls":
                return h_BLD[:, :1]
            if tap.token_kind == "mean":
                return patches_BPD.float().mean(1, keepdim=True)
            if tap.token_kind == "all":
                return torch.cat([h_BLD[:, :1], patches_BPD], 1)
            return patches_BPD
        h_BHWC = h if bb.channels_last else h.permute(0, 2, 3, 1)
        spatial_BPC = h_BHWC.flatten(1, 2)  # positions in row-major order
        return spatial_BPC.float().mean(1, keepdim=True) if tap.token_kind == "mean" else spatial_BPC

    @torch.no_grad()
    def __call__(self, x_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        self._out = {}
        try:
            if self._need_embedding:
                self._out["embedding"] = self.bb.embed(x_BCHW).float()[:, None]
            else:
                self.bb.features(x_BCHW)
        except _Stop:
            pass
        out, self._out = self._out, {}
        return {t.name: out[t.name].contiguous() for t in self.taps}

    def layer_specs(self, image_size: tuple[int, int]) -> tuple[LayerSpec, ...]:
        """Widths and tokens per image, read off one forward pass of a blank image."""
        param = next(self.bb.module.parameters())
        probe = self(torch.zeros(1, 3, *image_size, dtype=param.dtype, device=param.device))
        return tuple(LayerSpec(t.name, t.source, t.kind, int(probe[t.name].shape[2]), int(probe[t.name].shape[1]),
                               t.token_kind) for t in self.taps)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
