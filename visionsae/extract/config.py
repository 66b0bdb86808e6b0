"""The settings of one extraction. The CLI fills it from flags; Python callers build it directly."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from visionsae.errors import UserError
from visionsae.images import DATASETS, SPLITS
from visionsae.extract.layers import TOKENS

DTYPES = ("float16", "bfloat16", "float32")
FORMATS = ("zarr", "hdf5")
MODES = ("new", "resume", "overwrite")
DEVICES = ("auto", "cuda", "cpu")


@dataclasses.dataclass
class ExtractConfig:
    model: str = "efficientnet-lite0"  # an alias (backbones.ALIASES), timm:NAME or open_clip:ARCH[:TAG]
    dataset: str = "digits"
    data_root: str | None = None
    split: str = "train"
    layers: tuple[str, ...] | None = None  # None: the model's default (layers.default_layers)
    tokens: str | None = None  # None: cls where the model has a class token, else mean
    dtype: str = "float16"  # storage dtype of the activations
    batch_size: int = 64
    workers: int | None = None  # image-decoding processes; None: see n_workers()
    limit: int | None = None  # keep this many images, spread evenly over the split
    device: str = "auto"
    random_init: bool = False
    weights: str | None = None  # a local state dict instead of the library's pretrained weights
    format: str = "zarr"
    out: str | None = None  # None: runs/<model>-<dataset>-<split>.<zarr|h5>
    mode: str = "new"  # new: refuse an existing store; resume; overwrite
    strict: bool = False  # an unreadable image fails the run instead of being skipped
    images_per_shard: int = 1024
    progress: bool = True
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # to timm / open_clip (e.g. img_size)

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            self.layers = tuple(p for p in self.layers.split(",") if p.strip())
        elif self.layers is not None:
            self.layers = tuple(self.layers)

    def validate(self) -> None:
        for name, value, allowed in (("dataset", self.dataset, DATASETS), ("split", self.split, SPLITS),
                                     ("dtype", self.dtype, DTYPES), ("format", self.format, FORMATS),
                                     ("mode", self.mode, MODES), ("device", self.device, DEVICES)):
            if value not in allowed:
                raise UserError(f"unknown {name} '{value}': choose one of {', '.join(allowed)}")
        if self.tokens is not None and self.tokens not in TOKENS:
            raise UserError(f"unknown tokens '{self.tokens}': choose one of {', '.join(TOKENS)}")
        for name in ("batch_size", "images_per_shard", "limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be 0 or more, got {self.workers}")
        if self.layers is not None and not self.layers:
            raise UserError("--layers is empty: name at least one layer (e.g. -1 or embedding)")

    def out_path(self) -> str:
        if self.out:
            return self.out
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.model).strip("-")
        return os.path.join("runs", f"{slug}-{self.dataset}-{self.split}.{'zarr' if self.format == 'zarr' else 'h5'}")

    def n_workers(self) -> int:
        """Default: the cores this process may use (torchrun shares them among its local ranks), less
        the one that runs the model loop: decoding JPEGs is the slow side of a GPU extraction (one worker
        decodes a few hundred ImageNet images per second; a GPU forwards thousands), so no fixed cap."""
        if self.workers is not None:
            return self.workers
        per_rank = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return max(0, per_rank - 1)
