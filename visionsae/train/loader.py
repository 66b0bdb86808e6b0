"""Shuffled training batches from an activation store, with mostly sequential reads.

The order of training rows is a pure function of (seed, epoch): each epoch visits the shards in a
random order, in groups of G shards; the rows of a group are read whole (one sequential read per
shard file, memory-mapped) and permuted together in memory with one vectorised gather per batch. The
epochs are concatenated into one stream and batch t is rows [t*B, (t+1)*B) of it, so batches never
run short at an epoch end and resuming at step t needs no data, only arithmetic. When the training
rows fit in device memory (``preload``), G is every shard: the rows are loaded once and each epoch is
one global permutation, gathered on the device.

Validation holds out whole IMAGES (a seeded choice among the valid slots): none of their tokens is
ever in the stream. Each rank of a distributed run takes its own slice of every batch.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from visionsae.errors import UserError
from visionsae.store import Store

_SPLIT_KEY = 0x5A1  # separates the split's random stream from the shuffle's
READ_THREADS = min(8, os.cpu_count() or 1)


def make_split(store: Store, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_slots, val_slots), sorted int64: a deterministic choice of valid images for validation."""
    valid = np.flatnonzero(store.valid)
    if valid.size == 0:
        raise UserError(f"{store.path} has no valid images (every image was unreadable at extraction)")
    n_val = int(round(val_fraction * valid.size))
    if val_fraction > 0 and valid.size > 1:
        n_val = min(max(n_val, 1), valid.size - 1)
    rng = np.random.default_rng([seed, _SPLIT_KEY])
    val = np.sort(rng.choice(valid, size=n_val, replace=False)) if n_val else np.zeros(0, np.int64)
    train = np.setdiff1d(valid, val, assume_unique=True)
    return train.astype(np.int64), val.astype(np.int64)


def as_torch(arr: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A storage-dtype array as a torch tensor of the same bits (bfloat16 arrives as uint16)."""
    arr = np.ascontiguousarray(arr)
    if dtype_name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


@dataclass
class Piece:
    data: object  # np.ndarray (group buffer) or torch.Tensor (preloaded rows)
    idx: np.ndarray  # rows of data, in stream order


class RowOrder:
    """Which rows, in which order: shard groups per epoch and a permutation per group."""

    def __init__(self, store: Store, layer: str, train_slots: np.ndarray, seed: int, group_shards: int):
        self.store, self.layer, self.seed = store, layer, seed
        T = store.layer(layer).tokens_per_image
        is_train = np.zeros(store.n_images, dtype=bool)
        is_train[train_slots] = True
        # Per shard: offsets (within the shard's rows) of its training rows.
        self.local_rows: list[np.ndarray] = []
        for s in range(store.n_shards):
            a, b = store.shard_slots(s)
            slots = np.flatnonzero(is_train[a:b])
            self.local_rows.append((slots[:, None] * T + np.arange(T)[None, :]).reshape(-1))
        self.counts = np.array([r.size for r in self.local_rows], dtype=np.int64)
        self.n_rows = int(self.counts.sum())
        if self.n_rows == 0:
            raise UserError(f"no training rows in {store.path} after holding out the validation images: "
                            "lower --val-fraction")
        self.shards = np.flatnonzero(self.counts)
        self.group_shards = max(1, min(int(group_shards), self.shards.size))
        # Start of each shard's rows in the preloaded array (natural shard order).
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])[:-1]

    def groups(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.shards)
        G = self.group_shards
        return [order[i:i + G] for i in range(0, order.size, G)]

    def perm(self, epoch: int, g: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, g + 1]).permutation(n)

    def locate(self, row: int) -> tuple[int, int, int]:
        """(epoch, group, offset) of stream position ``row``."""
        epoch, rem = divmod(row, self.n_rows)
        for g, shards in enumerate(self.groups(epoch)):
            size = int(self.counts[shards].sum())
            if rem < size:
                return epoch, g, rem
            rem -= size
        raise AssertionError("stream position beyond its epoch")  # sizes sum to n_rows


class Loader:
    """Batches of scaled float32 training rows on ``device``; this rank's slice of each global batch."""

    def __init__(self, store: Store, layer: str, train_slots: np.ndarray, *, batch_size: int, seed: int,
                 device: torch.device, scale: float, preload: bool, buffer_bytes: int, prefetch: int = 4,
                 rank: int = 0, world: int = 1, group_shards: int | None = None):
        self.store, self.layer, self.info = store, layer, store.layer(layer)
        self.B, self.device, self.scale = batch_size, device, float(scale)
        self.rank, self.world, self.prefetch = rank, world, max(1, prefetch)
        if batch_size % world:
            raise UserError(f"--batch-size {batch_size} must be divisible by the number of processes ({world})")
        self.b = batch_size // world
        itemsize = np.dtype(np.float32 if self.info.dtype == "float32" else np.uint16).itemsize
        shard_bytes = store.images_per_shard * self.info.tokens_per_image * self.info.d * itemsize
        if group_shards is None:
            group_shards = store.n_shards if preload else max(1, buffer_bytes // max(shard_bytes, 1))
        self.order = RowOrder(store, layer, train_slots, seed, group_shards)
        self.preload = preload
        self.data: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def group_shards(self) -> int:
        return self.order.group_shards

    @property
    def n_rows(self) -> int:
        return self.order.n_rows

    # --- reading ---------------------------------------------------------------------------
    def _read_shard(self, s: int) -> np.ndarray:
        """The training rows of shard s in storage dtype, checksum-verified on first full read."""
        self.store.verify_shard(int(s))
        arr = self.store.shard_array(self.layer, int(s))
        rows = self.order.local_rows[s]
        if rows.size == arr.shape[0]:
            return np.array(arr)  # one sequential read
        return arr[rows]

    def _read_shards(self, shards, pool: ThreadPoolExecutor) -> np.ndarray:
        # Shards are read and checksummed in parallel: np.array and zlib.crc32 release the GIL.
        parts = list(pool.map(self._read_shard, shards))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def load_all(self) -> None:
        """Preload mode: every training row, natural shard order, on the device."""
        if self.data is None:
            with ThreadPoolExecutor(READ_THREADS) as pool:
                rows = self._read_shards(self.order.shards, pool)
            self.data = as_torch(rows, self.info.dtype).to(self.device)

    def _to_batch(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(self.device, non_blocking=True).float().mul_(self.scale)

    # --- the stream --------------------------------------------------------------------------
    def _plan(self, start_row: int) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """(epoch, group, shards, offset) of every group from stream position ``start_row`` on."""
        epoch, g, offset = self.order.locate(start_row)
        while True:
            groups = self.order.groups(epoch)
            for gi in range(g, len(groups)):
                yield epoch, gi, groups[gi], offset
                offset = 0
            epoch, g = epoch + 1, 0

    def _pieces(self, start_row: int, read_ahead: bool = True) -> Iterator[Piece]:
        """Stream order from ``start_row`` on, as (data, row indices) pieces, group after group."""
        plan = self._plan(start_row)
        if self.preload:
            self.load_all()
            for epoch, gi, shards, offset in plan:
                # Group-local position -> row of the preloaded array.
                base = np.concatenate([self.order.offsets[s] + np.arange(self.order.counts[s]) for s in shards])
                yield Piece(self.data, base[self.order.perm(epoch, gi, base.size)[offset:]])
        # Streaming: the next group is read while this one is consumed (two group buffers in memory).
        readers, ahead = ThreadPoolExecutor(READ_THREADS), ThreadPoolExecutor(1)
        try:
            nxt = next(plan)
            fut = ahead.submit(self._read_shards, nxt[2], readers)
            while True:
                (epoch, gi, _, offset), data = nxt, fut.result()
                if read_ahead:
                    nxt = next(plan)
                    fut = ahead.submit(self._read_shards, nxt[2], readers)
                yield Piece(data, self.order.perm(epoch, gi, data.shape[0])[offset:])
                if not read_ahead:
                    nxt = next(plan)
                    fut = ahead.submit(self._read_shards, nxt[2], readers)
        finally:
            ahead.shutdown(wait=False, cancel_futures=True)
            readers.shutdown(wait=False, cancel_futures=True)

    def _batches_of(self, start_step: int) -> Iterator[torch.Tensor]:
        """This rank's rows of every global batch from ``start_step`` on (CPU tensors, or device when preloaded)."""
        lo, hi = self.rank * self.b, (self.rank + 1) * self.b
        pending: list[Piece] = []
        have = 0
        for piece in self._pieces(start_step * self.B):
            pos = 0
            while pos < piece.idx.size:
                take = min(self.B - have, piece.idx.size - pos)
                pending.append(Piece(piece.data, piece.idx[pos:pos + take]))
                have += take
                pos += take
                if have == self.B:
                    yield self._gather(pending, lo, hi)
                    pending, have = [], 0

    def _gather(self, pieces: list[Piece], lo: int, hi: int) -> torch.Tensor:
        out, start = [], 0
        for p in pieces:
            a, b = max(lo - start, 0), min(hi - start, p.idx.size)
            if a < b:
                sel = p.idx[a:b]
                if isinstance(p.data, torch.Tensor):
                    out.append(p.data[torch.from_numpy(sel).to(p.data.device)])
                else:
                    out.append(as_torch(p.data[sel], self.info.dtype))
            start += p.idx.size
        return out[0] if len(out) == 1 else torch.cat(out)

    def batches(self, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Scaled float32 batches [B / world, d] on the device, forever, from global step ``start_step``."""
        if self.preload:
            for rows in self._batches_of(start_step):
                yield self._to_batch(rows)
            return
        yield from self._threaded(start_step)

    def _threaded(self, start_step: int) -> Iterator[torch.Tensor]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop.clear()
        pin = self.device.type == "cuda"

        def put(item) -> bool:
            """Queue ``item`` unless asked to stop meanwhile; False when stopping."""
            while not self._stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for rows in self._batches_of(start_step):
                    # On a GPU the device converts (half the bytes cross the bus); on a CPU this thread does.
                    if not put(rows.pin_memory() if pin else self._to_batch(rows)):
                        return
            except BaseException as err:  # handed to the consumer, which raises it
                put(err)

        self._thread = threading.Thread(target=produce, name="visionsae-loader", daemon=True)
        self._thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield self._to_batch(item) if pin else item
        finally:
            self.close()

    def sample(self, n: int) -> torch.Tensor:
        """The first n rows of the stream (all ranks get the same rows): data for initialisation."""
        n = min(n, self.n_rows)
        pieces, have = [], 0
        for piece in self._pieces(0, read_ahead=False):
            take = piece.idx[: n - have]
            pieces.append(Piece(piece.data, take))
            have += take.size
            if have == n:
                break
        return self._to_batch(self._gather(pieces, 0, n))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
