"""The two helpers around the extraction loop: a background shard writer and torchrun coordination."""

from __future__ import annotations

import dataclasses
import datetime
import os
import queue
import threading
from typing import Any

import torch

from visionsae.errors import UserError
from visionsae.store import StoreWriter


class BackgroundWriter:
    """Writes finished shards on a thread so the backbone never waits for the disk.

    The queue holds one shard: with one being written and one being computed, at most three shards
    are in memory. An error on the thread is raised in the caller at its next ``submit``/``close``.
    """

    def __init__(self, writer: StoreWriter, depth: int = 1):
        self.writer, self.written = writer, 0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain, so that a blocked submit() wakes up and sees the error
            shard, fields = item
            try:
                acts = fields.pop("acts")
                if isinstance(acts, PendingCopy):
                    acts = acts.wait()  # the side stream's copies to pinned memory (this thread waits, not the GPU)
                self.writer.write_shard(shard, acts=acts, **fields)
                self.written += 1
            except BaseException as err:  # re-raised in the caller's thread
                self._error = err

    def submit(self, shard: int, **fields: Any) -> None:
        self._check()
        self._queue.put((shard, fields))

    def close(self, *, raise_errors: bool = True) -> None:
        """Finish the queued shards (they are computed already) and stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if raise_errors:
            self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error


class PendingCopy:
    """A shard's device buffers on their way to pinned host memory, copied on a side stream.

    The compute stream never waits: the side stream waits for the compute stream's event (the shard's
    rows are written) and copies in the stored dtype (half the bytes of float32 for float16/bfloat16);
    the writer thread then waits for the copies' event. ``record_stream`` keeps the device buffers from
    being reused by the allocator before the copies have read them."""

    def __init__(self, acts_dev: dict[str, torch.Tensor], stream: "torch.cuda.Stream"):
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(stream.device))
        stream.wait_event(ready)
        self.host: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(stream):
            for name, t in acts_dev.items():
                self.host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self.host[name].copy_(t, non_blocking=True)
                t.record_stream(stream)
            self.done = torch.cuda.Event()
            self.done.record(stream)

    def wait(self) -> dict[str, torch.Tensor]:
        self.done.synchronize()
        return self.host


def copy_to_host(acts: dict[str, torch.Tensor], stream: "torch.cuda.Stream | None"):
    """Start the device-to-host copy of a finished shard (CPU tensors: nothing to copy)."""
    if stream is None or not any(t.is_cuda for t in acts.values()):
        return acts
    return PendingCopy(acts, stream)


@dataclasses.dataclass
class Ranks:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run alone).

    Coordination is two barriers and one broadcast of a short message, so it uses gloo even next to
    GPUs: no tensor travels between ranks (each writes its own shards into the shared store), and a
    CPU group cannot hang on a GPU collective or a wrong device mapping.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            # generous: rank 0 may wait at the final barrier while slower ranks finish their shards
            torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=12))

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def share_error(self, error: UserError | None) -> None:
        """Rank 0 says whether it could set the store up; every rank then stops, or goes on, together."""
        message = str(error) if error else None
        if self.world > 1:
            box = [message]
            torch.distributed.broadcast_object_list(box, src=0)
            message = box[0]
        if error is not None:
            raise error  # rank 0 keeps the exception's type (StoreError, ...)
        if message:
            raise UserError(message)

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
