"""The settings of one extraction. The CLI is generated from it (cli_options); Python callers build it directly."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from visionsae.cli_options import option
from visionsae.errors import UserError
from visionsae.images import DATASETS, SPLITS
from visionsae.extract.layers import TOKENS

DTYPES = ("float16", "bfloat16", "float32")
FORMATS = ("zarr", "hdf5")
MODES = ("new", "resume", "overwrite")
DEVICES = ("auto", "cuda", "cpu")


def _model_choices() -> str:
    from visionsae.extract.backbones import model_choices  # at --help time: backbones imports torch
    return model_choices()


@dataclasses.dataclass
class ExtractConfig:
    model: str = option("efficientnet-lite0", help=lambda: f"One of {_model_choices()}.")
    dataset: str = option("digits", help=f"One of {', '.join(DATASETS)}.")
    data_root: str | None = option(None, help="Dataset location (fashion-mnist defaults to the Debian package's "
                                   "folder; imagenet and folder need it).")
    split: str = option("train", help="train or val.")
    layers: tuple[str, ...] | None = option(None, cli_type=str, help="Comma-separated: block indices (negative from "
                                            "the end, e.g. 6,-1), block_N / stage_N, or embedding. [default: last "
                                            "block of a transformer; embedding of a CNN (layers.default_layers)]")
    tokens: str | None = option(None, help=f"Rows kept per image at blocks/stages: {', '.join(TOKENS)}. [default: "
                                "cls, or mean for models without a class token]")
    dtype: str = option("float16", help=f"Storage dtype of the activations: {', '.join(DTYPES)}.")
    batch_size: int = option(64)
    workers: int | None = option(None, help="Image-decoding processes. [default: the CPUs this rank may use, less "
                                 "one (n_workers)]")
    limit: int | None = option(None, help="Keep N images spread evenly over the split.")
    device: str = option("auto", help="auto, cuda or cpu.")
    random_init: bool = option(False, help="Random weights (seeded): no download, for tests.")
    weights: str | None = option(None, help="Local state dict (.safetensors or torch) instead of downloading.")
    format: str = option("zarr", help=f"Store format: {', '.join(FORMATS)}.")
    out: str | None = option(None, help="Store path. [default: runs/<model>-<dataset>-<split>.<zarr|h5>]")
    mode: str = option("new", cli=False)  # new: refuse an existing store; resume; overwrite (sae-extract's flags)
    strict: bool = option(False, help="Fail on an unreadable image instead of skipping it.")
    images_per_shard: int = option(1024)
    progress: bool = option(True, off="--quiet", help="No progress bar.")
    model_kwargs: dict[str, Any] = option(default_factory=dict, cli=False)  # to timm / open_clip (e.g. img_size)

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
