"""``extract(cfg)``: images -> backbone -> activation store, one shard at a time.

Batches are formed within each shard, starting at the shard's first slot, so an image is always
batched with the same neighbours: a resumed run, or one split over several processes, computes
exactly the same numbers and writes the same bytes as one uninterrupted run. While the backbone
computes the next shard, a thread writes the last one (checksums, fsync, manifest record).

Under ``torchrun --nproc-per-node N -m visionsae.extract.cli ...`` rank r takes shards s with
s % N == r. Rank 0 creates (or reopens) the store, the others join it after a barrier; at the end
a barrier, then rank 0 checks every shard record and marks the store complete.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from visionsae.errors import UserError
from visionsae.extract.backbones import Backbone, load_backbone
from visionsae.extract.config import ExtractConfig
from visionsae.extract.slots import SlotImages
from visionsae.images import ImageSource, even_subset, open_dataset
from visionsae.extract.layers import Capture, default_tokens, resolve_layers
from visionsae.extract.concurrency import BackgroundWriter, Ranks, copy_to_host
from visionsae.device import resolve_device
from visionsae.store import StoreSpec, StoreWriter, open_store
from visionsae.store.extras import write_head
from visionsae.store.layout import torch_dtype


class ExtractResult(NamedTuple):
    path: str
    n_images: int  # slots in the store
    n_shards: int
    shards_written: int  # by this process in this run (the others were done before, or by other ranks)
    images_written: int
    n_skipped: int  # unreadable images in the finished store (rank 0; -1 on other ranks)
    seconds: float


class Plan(NamedTuple):
    """Everything that fixes the bytes of the store, built the same way on every rank."""

    backbone: Backbone
    capture: Capture
    source: ImageSource
    positions: np.ndarray  # slot -> position in the source
    spec: StoreSpec
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format

    # ``with build_plan(...) as plan``: the capture's forward hooks leave the backbone when the plan is done
    # with, whether extraction finished or failed (the caller's backbone is then as it was).
    def __enter__(self) -> "Plan":
        return self

    def __exit__(self, *exc: object) -> None:
        self.capture.close()


def extract(cfg: ExtractConfig) -> ExtractResult:
    cfg.validate()
    ranks = Ranks.from_env()
    if ranks.world > 1 and cfg.format == "hdf5":
        raise UserError("HDF5 stores are written by one process: use --format zarr under torchrun")
    t0 = time.perf_counter()
    ranks.init()
    try:
        with build_plan(cfg, ranks.local_rank) as plan:
            return run_plan(plan, cfg, ranks, t0)
    finally:
        ranks.close()


def run_plan(plan: "Plan", cfg: ExtractConfig, ranks: Ranks | None = None, t0: float | None = None
             ) -> ExtractResult:
    """Write the store that ``plan`` describes (this rank's missing shards), then finalize it."""
    ranks = ranks or Ranks()
    t0 = time.perf_counter() if t0 is None else t0
    writer = _open_writer(plan.spec, cfg, ranks)
    try:
        written, images = _run(plan, writer, cfg, ranks)
        ranks.barrier()  # every rank's shard records are on disk
        if ranks.rank == 0:
            writer.finalize()
    finally:
        writer.close()
    if ranks.rank == 0 and plan.backbone.head is not None:  # the optional head (cache_layout.md section 11)
        write_head(cfg.out_path(), *plan.backbone.head)
    n_skipped = int(open_store(cfg.out_path()).attrs.get("n_skipped", 0)) if ranks.rank == 0 else -1
    return ExtractResult(cfg.out_path(), plan.spec.n_images, plan.spec.n_shards, written, images, n_skipped,
                         time.perf_counter() - t0)


def build_plan(cfg: ExtractConfig, local_rank: int = 0) -> Plan:
    device = _device(cfg.device, local_rank)
    source = open_dataset(cfg.dataset, cfg.data_root, cfg.split)
    bb = load_backbone(cfg.model, random_init=cfg.random_init, weights=cfg.weights, model_kwargs=cfg.model_kwargs)
    tokens = cfg.tokens or default_tokens(bb)
    taps = resolve_layers(bb, cfg.layers, tokens)
    # CNNs run channels-last: about 1.4x faster convolutions on this CPU, and the layout cuDNN prefers
    memory_format = torch.preserve_format if bb.is_transformer else torch.channels_last
    bb.module.to(device=device, memory_format=memory_format)
    capture = Capture(bb, taps)
    try:  # every check below may refuse: the hooks must not stay on the caller's backbone
        blank_CHW = bb.transform(Image.new("RGB", (32, 32)))
        layers = capture.layer_specs(tuple(blank_CHW.shape[1:]))
        positions = even_subset(len(source), cfg.limit)
        amp_dtype = _autocast_dtype(device)
        backbone_attrs = bb.attrs()
        if cfg.model_kwargs:
            backbone_attrs["kwargs"] = dict(cfg.model_kwargs)
        spec = StoreSpec(
            backbone=backbone_attrs, dataset=source.attrs(len(positions)), tokens=tokens, dtype=cfg.dtype,
            layers=layers, images_per_shard=cfg.images_per_shard, format=cfg.format,
            # what changes the numbers: a resume must repeat these (the writer checks)
            extract={"batch_size": cfg.batch_size, "limit": cfg.limit, "device_type": device.type,
                     "autocast": str(amp_dtype).removeprefix("torch.") if amp_dtype else None},
        )
        return Plan(bb, capture, source, positions, spec, device, amp_dtype, memory_format)
    except BaseException:
        capture.close()
        raise


def _device(choice: str, local_rank: int) -> torch.device:
    # ranks share the visible GPUs round-robin (extraction needs no collective on its own device)
    device = resolve_device(choice, local_rank % max(torch.cuda.device_count(), 1))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that have it (fp16 otherwise); none on the CPU, where it is slow and changes nothing
    about what is stored beyond rounding."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _open_writer(spec: StoreSpec, cfg: ExtractConfig, ranks: Ranks) -> StoreWriter:
    path = Path(cfg.out_path())
    error, writer = None, None
    if ranks.rank == 0:
        try:
            writer = StoreWriter.create(path, spec, mode=cfg.mode)
        except UserError as err:
            error = err
    ranks.share_error(error)
    if writer is None:
        writer = StoreWriter.create(path, spec, mode="join")
    return writer


def shard_batches(spec: StoreSpec, shards: list[int], batch_size: int) -> list[tuple[int, int, int]]:
    """(shard, first slot, stop slot) of every batch; batches start at each shard's first slot."""
    out = []
    for s in shards:
        start = s * spec.images_per_shard
        stop = min(start + spec.images_per_shard, spec.n_images)
        out += [(s, a, min(a + batch_size, stop)) for a in range(start, stop, batch_size)]
    return out


def make_loader(plan: Plan, cfg: ExtractConfig, batches: list[tuple[int, int, int]]) -> DataLoader:
    """Decoded, preprocessed batches in exactly the order of ``batches`` (workers keep the order)."""
    blank_CHW = torch.zeros_like(plan.backbone.transform(Image.new("RGB", (32, 32))))
    images = SlotImages(plan.source, plan.positions, plan.backbone.transform, blank_CHW)
    return DataLoader(images, batch_sampler=[list(range(a, b)) for _, a, b in batches],
                      num_workers=cfg.n_workers(), pin_memory=plan.device.type == "cuda")


def forward(plan: Plan, x_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
    """One batch through the backbone: the kept rows of every layer, [B, T, d] on the device, in the
    backbone's dtype (the shard buffer casts them to the store's dtype on the device)."""
    cuda = plan.device.type == "cuda"
    amp = torch.autocast("cuda", dtype=plan.amp_dtype) if plan.amp_dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        return plan.capture(x_BCHW.to(plan.device, non_blocking=cuda, memory_format=plan.memory_format))


def _run(plan: Plan, writer: StoreWriter, cfg: ExtractConfig, ranks: Ranks) -> tuple[int, int]:
    done = writer.done_shards()
    mine = [s for s in range(writer.n_shards) if s % ranks.world == ranks.rank and s not in done]
    batches = shard_batches(plan.spec, mine, cfg.batch_size)
    if not batches:
        return 0, 0
    loader = make_loader(plan, cfg, batches)
    store_dtype = torch_dtype(cfg.dtype)
    layers = {la.name: la for la in plan.spec.layers}
    n_images = sum(b - a for _, a, b in batches)
    bar = tqdm(total=n_images, unit="img", disable=not cfg.progress or ranks.rank != 0, smoothing=0.1,
               desc="extract" if ranks.world == 1 else f"extract (rank 0 of {ranks.world})")
    bg = BackgroundWriter(writer)
    copy_stream = torch.cuda.Stream(plan.device) if plan.device.type == "cuda" else None
    shard, buf, valid_parts = -1, {}, []
    try:
        for (s, a, b), (x_BCHW, ok_B, why_B) in zip(batches, loader):
            if cfg.strict and not bool(ok_B.all()):
                bad = why_B[int((~ok_B).nonzero()[0, 0])]
                raise UserError(f"cannot read image {bad}: fix or remove it, or drop --strict to skip "
                                "unreadable images (they are recorded as valid = 0)")
            start, stop = writer.shard_slots(s)
            if s != shard:  # a new shard: its buffers live on the device until the writer copies them
                shard, valid_parts = s, []
                buf = {name: torch.empty(((stop - start) * la.tokens_per_image, la.d), dtype=store_dtype,
                                         device=plan.device) for name, la in layers.items()}
            out = forward(plan, x_BCHW)
            for name, rows_BTD in out.items():
                T = layers[name].tokens_per_image
                buf[name][(a - start) * T:(b - start) * T] = rows_BTD.reshape(-1, rows_BTD.shape[-1])
            valid_parts.append(ok_B.numpy())
            if b == stop:
                pos = plan.positions[start:stop]
                bg.submit(s, index=plan.source.indices[pos], label=plan.source.labels[pos],
                          valid=np.concatenate(valid_parts), acts=copy_to_host(buf, copy_stream))
                buf = {}
            bar.update(b - a)
    except BaseException:
        bg.close(raise_errors=False)
        raise
    finally:
        bar.close()
    bg.close()
    return bg.written, n_images
