"""Shuffled training batches from an activation store, with sequential reads.

The order of training rows is a pure function of (seed, epoch): each epoch visits the shards in a
random order, in groups of G shards; the chunk files of a group are read whole (one sequential read
per shard, straight into a group buffer in the stored dtype, checksummed on those same bytes) and
permuted together with one gather per batch. The epochs are concatenated into one stream and batch t
is rows [t*B, (t+1)*B) of it, so batches never run short at an epoch end and resuming at step t needs
no data, only arithmetic. When the training rows fit in device memory (``preload``), the group buffer
holds every shard: it is read once and each epoch is one global permutation.

Where the work runs: on the CPU a producer thread gathers, converts and scales each batch from the group
buffer in one pass (a compiled kernel, or eager ops over cache-sized blocks: see gather.py). On CUDA, shard
files are read into pinned staging buffers and copied asynchronously to a device-resident group buffer (two
of them: one consumed while the next fills); the group's permutation is computed on the host (numpy, so every
device gets the same order) and uploaded once per group, and the gather, float conversion and scaling
of each batch run on the device. Nothing in a steady-state step waits for the device.

Validation holds out whole IMAGES (a seeded choice among the valid slots): none of their tokens is
ever in the stream. Each rank of a distributed run takes its own slice of every batch.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from visionsae.errors import UserError
from visionsae.store import Store
from visionsae.store.layout import storage_dtype, torch_dtype
from visionsae.train.gather import FUSE_MIN_ROWS, CpuGather, random_access_empty

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
    data: torch.Tensor  # a group buffer in the stored dtype (CPU, or on the device)
    idx: torch.Tensor  # int64 rows of data, in stream order (on data's device)


class RowOrder:
    """Which rows, in which order: shard groups per epoch and a permutation per group."""

    def __init__(self, store: Store, layer: str, train_slots: np.ndarray, seed: int, group_shards: int):
        self.store, self.layer, self.seed = store, layer, seed
        T = store.layer(layer).tokens_per_image
        is_train = np.zeros(store.n_images, dtype=bool)
        is_train[train_slots] = True
        # Per shard: its training images (slot offsets within the shard); their rows are expanded per group
        # when it is read, so the run holds one small int per training image, not an int64 per row.
        self.T = T
        self.local_slots: list[np.ndarray] = []
        for s in range(store.n_shards):
            a, b = store.shard_slots(s)
            self.local_slots.append(np.flatnonzero(is_train[a:b]).astype(np.int32))
        self.counts = np.array([sl.size * T for sl in self.local_slots], dtype=np.int64)
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

    def buffer_rows(self, shards: np.ndarray, slots, chunk_rows: int) -> np.ndarray:
        """Rows of a group buffer (shard shards[i] in slot slots[i] of chunk_rows rows) holding the group's
        training rows, in the group's order: position j of the group is buffer row buffer_rows(...)[j]."""
        return np.concatenate([slot * chunk_rows + self.local_rows(s) for slot, s in zip(slots, shards)])

    def local_rows(self, shard: int) -> np.ndarray:
        """int64 offsets, within shard ``shard``'s rows, of its training rows (image by image, token by token)."""
        return (self.local_slots[shard][:, None].astype(np.int64) * self.T + np.arange(self.T)).reshape(-1)

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
                 rank: int = 0, world: int = 1, group_shards: int | None = None, fused_gather: bool | None = None):
        self.store, self.layer, self.info = store, layer, store.layer(layer)
        self.B, self.device, self.scale = batch_size, device, float(scale)
        self.rank, self.world, self.prefetch = rank, world, max(1, prefetch)
        if batch_size % world:
            raise UserError(f"--batch-size {batch_size} must be divisible by the number of processes ({world})")
        self.b = batch_size // world
        self.chunk_rows = store.images_per_shard * self.info.tokens_per_image
        self.np_dtype = storage_dtype(self.info.dtype)
        self.torch_dtype = torch_dtype(self.info.dtype)
        shard_bytes = self.chunk_rows * self.info.d * self.np_dtype.itemsize
        if group_shards is None:
            group_shards = store.n_shards if preload else max(1, buffer_bytes // max(shard_bytes, 1))
        self.order = RowOrder(store, layer, train_slots, seed, group_shards)
        self.preload = preload
        self.cuda = device.type == "cuda"
        # CPU: gather with the compiled one-pass kernel (None: when an epoch is long enough to repay compiling it)
        self.fused_gather = (not self.cuda and (self.order.n_rows >= FUSE_MIN_ROWS if fused_gather is None
                                                 else bool(fused_gather)))
        self.data: torch.Tensor | None = None  # preload: every shard, shard s in slot s
        self._buffers: list[torch.Tensor] = []  # streaming: two group buffers, used in turn
        self._staging: queue.Queue | None = None  # CUDA: free pinned shard buffers
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def group_shards(self) -> int:
        return self.order.group_shards

    @property
    def n_rows(self) -> int:
        return self.order.n_rows

    # --- buffers -----------------------------------------------------------------------------
    def _empty(self, rows: int, device: torch.device, pin: bool = False) -> torch.Tensor:
        """Rows in the stored dtype (bfloat16 as torch.bfloat16, whose bits the store's uint16 are)."""
        if device.type == "cpu" and not pin:  # a group buffer, gathered from at random rows
            return random_access_empty(rows, self.info.d, self.torch_dtype)
        return torch.empty((rows, self.info.d), dtype=self.torch_dtype, device=device, pin_memory=pin)

    @staticmethod
    def _as_numpy(t: torch.Tensor) -> np.ndarray:
        """A numpy view of a CPU buffer that the store's reader can fill (bfloat16 as uint16)."""
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()

    def _read_shard(self, s: int, out: np.ndarray) -> None:
        """Shard s's rows into out: one sequential read, checksummed on the bytes read, and the shard's
        image arrays verified too before any of its rows is used."""
        self.store.read_shard_into(self.layer, int(s), out)
        self.store.verify_shard(int(s), layers=[self.layer])

    def _fill(self, buf: torch.Tensor, shards, slots, pool: ThreadPoolExecutor,
              after: "torch.cuda.Event | None" = None) -> None:
        """Read ``shards`` into ``buf`` (slot slots[i] for shard shards[i]); returns when the rows are there."""
        cr = self.chunk_rows
        if not self.cuda:
            host = self._as_numpy(buf)
            list(pool.map(lambda a: self._read_shard(a[1], host[a[0] * cr:(a[0] + 1) * cr]), zip(slots, shards)))
            return
        copy_stream = self._copy_stream
        if after is not None:  # the previous group in this buffer has been gathered by the compute stream
            copy_stream.wait_event(after)

        def one(slot_shard):
            slot, s = slot_shard
            staging = self._staging.get()
            try:
                self._read_shard(s, self._as_numpy(staging))
                # pool threads start on device 0: name the device (torchrun rank r trains on cuda:r)
                with torch.cuda.device(self.device), torch.cuda.stream(copy_stream):
                    buf[slot * cr:(slot + 1) * cr].copy_(staging, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(copy_stream)
                _wait(done)  # polls: the staging buffer is reusable once its copy has finished
            finally:
                self._staging.put(staging)

        list(pool.map(one, zip(slots, shards)))

    def _start_cuda(self) -> None:
        if self._staging is None:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._staging = queue.Queue()
            # A shard is large (1024 images x 197 tokens x 768 fp16 = 310 MB): a few staging buffers keep
            # the disk and the copy engine busy without pinning gigabytes of host memory.
            for _ in range(min(READ_THREADS, 4) + 1):
                self._staging.put(self._empty(self.chunk_rows, torch.device("cpu"), pin=True))

    def _upload(self, idx: np.ndarray) -> torch.Tensor:
        """A group's row order to the device, once per group, on the copy stream (the caller has synced it)."""
        t = torch.from_numpy(idx)
        if not self.cuda:
            return t
        with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
            dev = t.pin_memory().to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        _wait(done)
        dev.record_stream(self._compute_stream)
        return dev

    def load_all(self, pool: ThreadPoolExecutor) -> None:
        """Preload mode: every shard, shard s in slot s, on the device (read once)."""
        if self.data is None:
            if self.cuda:
                self._start_cuda()
            self.data = self._empty(self.store.n_shards * self.chunk_rows, self.device)
            self._fill(self.data, self.order.shards, self.order.shards, pool)

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

    def _group(self, buf: torch.Tensor, plan_item, slots, pool, after=None) -> Piece:
        epoch, gi, shards, offset = plan_item
        if buf is not self.data:
            self._fill(buf, shards, slots, pool, after)
        rows = self.order.buffer_rows(shards, slots, self.chunk_rows)
        return Piece(buf, self._upload(rows[self.order.perm(epoch, gi, rows.size)[offset:]]))

    def _pieces(self, start_row: int, read_ahead: bool = True) -> Iterator[Piece]:
        """Stream order from ``start_row`` on, as (buffer, row indices) pieces, group after group.

        Callers gather every row of a piece before asking for the next one: the buffer of group g is
        refilled with group g + 2 only then."""
        plan = self._plan(start_row)
        readers, ahead = ThreadPoolExecutor(READ_THREADS), ThreadPoolExecutor(1)
        if self.cuda:
            self._start_cuda()
            self._compute_stream = torch.cuda.current_stream(self.device)
        try:
            if self.preload:
                self.load_all(readers)
                for item in plan:
                    yield self._group(self.data, item, item[2], readers)
            if not self._buffers:
                rows = self.order.group_shards * self.chunk_rows
                self._buffers = [self._empty(rows, self.device) for _ in range(2)]
            g = 0

            def submit(item, g):
                after = None
                if self.cuda:  # the compute stream's gathers from this buffer's last group come first
                    after = torch.cuda.Event()
                    after.record(self._compute_stream)
                return ahead.submit(self._group, self._buffers[g % 2], item, range(len(item[2])), readers, after)

            fut = submit(next(plan), g)
            while True:
                piece = fut.result()
                g += 1
                if read_ahead:  # the other buffer's group has been gathered whole: refill it
                    fut = submit(next(plan), g)
                yield piece
                if not read_ahead:
                    fut = submit(next(plan), g)
        finally:
            ahead.shutdown(wait=True, cancel_futures=True)
            readers.shutdown(wait=True, cancel_futures=True)

    def _gather_into(self, out_RD: torch.Tensor, data: torch.Tensor, idx: torch.Tensor) -> None:
        """On the device: out = scale * float32(data[idx]), queued on the stream (one gather, into out itself for
        float32 stores)."""
        if data.dtype == torch.float32:
            torch.index_select(data, 0, idx, out=out_RD)
        else:
            out_RD.copy_(torch.index_select(data, 0, idx))
        out_RD.mul_(self.scale)

    def _cpu_gather(self) -> CpuGather:
        """A CPU gather for one stream, compiled (if asked) in the calling thread, not in a producer thread."""
        gather = CpuGather(self.torch_dtype, self.info.d, self.scale, self.fused_gather)
        self.fused_gather = gather.warm()  # a failed compile is not retried
        return gather

    def _batches_of(self, start_row: int, B: int, lo: int, hi: int, read_ahead: bool = True
                    ) -> Iterator[torch.Tensor]:
        """Rows [lo, hi) of every B-row batch of the stream from ``start_row`` on, scaled float32 on the device.
        Made in the caller's thread (the CPU gather is compiled here), run wherever it is iterated."""
        gather = self._gather_into if self.cuda else self._cpu_gather()
        return self._batches_with(gather, start_row, B, lo, hi, read_ahead)

    def _batches_with(self, gather, start_row: int, B: int, lo: int, hi: int, read_ahead: bool
                      ) -> Iterator[torch.Tensor]:
        out, have = None, 0
        for piece in self._pieces(start_row, read_ahead):
            pos, n = 0, piece.idx.shape[0]
            while pos < n:
                take = min(B - have, n - pos)
                a, c = max(lo, have), min(hi, have + take)  # this rank's part of these positions
                if a < c:
                    if out is None:
                        out = torch.empty((hi - lo, self.info.d), dtype=torch.float32, device=self.device)
                    gather(out[a - lo:c - lo], piece.data, piece.idx[pos + a - have:pos + c - have])
                have, pos = have + take, pos + take
                if have == B:
                    yield out
                    out, have = None, 0

    def batches(self, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Scaled float32 batches [B / world, d] on the device, forever, from global step ``start_step``."""
        lo, hi = self.rank * self.b, (self.rank + 1) * self.b
        # Gathers on the device are queued, not waited for: no thread needed. A preloaded CPU gather runs in
        # the consumer's thread: 1-2.5 ms per 4096 rows at d = 768 here, far below a CPU training step.
        if self.cuda or self.preload:
            yield from self._batches_of(start_step * self.B, self.B, lo, hi)
            return
        yield from self._threaded(self._batches_of(start_step * self.B, self.B, lo, hi))

    def _threaded(self, source: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """CPU streaming: a producer thread reads and gathers ahead of the training step."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop.clear()

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
                for batch in source:
                    if not put(batch):
                        return
            except BaseException as err:  # handed to the consumer, which raises it
                put(err)
            finally:
                source.close()

        self._thread = threading.Thread(target=produce, name="visionsae-loader", daemon=True)
        self._thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def sample(self, n: int) -> torch.Tensor:
        """The first n rows of the stream (all ranks get the same rows): data for initialisation."""
        n = min(n, self.n_rows)
        source = self._batches_of(0, n, 0, n, read_ahead=False)
        try:
            return next(source)
        finally:
            source.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None


def _wait(event: "torch.cuda.Event") -> None:
    """Wait for a copy by polling: a blocking event wait would count as a host sync (and block the GIL holder)."""
    while not event.query():
        time.sleep(5e-5)
