"""The loader's per-batch work on the CPU: out = scale * float32(data[idx]), rows of a group buffer in order.

Eager torch does it in three passes over the batch: gather the rows in the stored dtype, convert them to
float32, scale them. Two ways to do it in one pass over the output, both exact (the same float32 values):

- fused: one compiled kernel (torch.compile, inductor's C++ backend, one thread) reads each row once, converts
  and scales it in registers and writes it once. Measured at d = 768, float16, batches of 4096 random rows of
  a 201 MB buffer on this 2-core machine under load: 1.15-1.25x faster than the eager blocks below on one
  torch thread, and 2x with two (it makes no OpenMP team, which stalls when one of its threads is
  descheduled). Compiling costs seconds once per process and needs a C++ compiler: it is used for epochs
  long enough to repay it (or when asked), and the eager gather takes over when it cannot be compiled.
- eager, in blocks of rows that fit in a core's L2 with their float32 output: the three passes run over a
  block while it is in cache, so the output goes to memory once (1.08-1.24x faster than whole-batch passes on
  one thread).

Both run in one thread: the loader's producer thread (streaming) or the consumer's (preloaded).

Group buffers live on transparent huge pages where Linux allows: a random row of a 4 KiB-paged buffer of
hundreds of MB misses the TLB on nearly every read (the gather measured 1.11x faster from huge pages).
"""

from __future__ import annotations

import mmap
import sys
import threading

import numpy as np
import torch

BLOCK_BYTES = 1 << 20  # a block in the stored dtype plus its float32 output: half of this machine's 2 MiB L2
# An epoch of at least this many rows compiles the fused gather by default: compiling takes 4-15 s here (15
# with a cold inductor cache, under load) and saves 0.2-1.5 ms per 4096 rows at d = 768, i.e. 1-6 s per 16M
# rows, 15-90 s per ImageNet epoch (1.28M images x 197 tokens).
FUSE_MIN_ROWS = 1 << 24

_lock = threading.Lock()
_compiled = None


def _gather_scale(out_RD: torch.Tensor, data_ND: torch.Tensor, idx_R: torch.Tensor, scale: torch.Tensor) -> None:
    out_RD.copy_(torch.index_select(data_ND, 0, idx_R).to(torch.float32) * scale)


def _fused_kernel():
    global _compiled
    with _lock:
        if _compiled is None:
            # dynamic: one kernel for every number of rows (a batch that straddles two groups gathers twice);
            # cpp.threads 1: no OpenMP team, which stalls when a thread of it is descheduled on a busy machine.
            _compiled = torch.compile(_gather_scale, dynamic=True, fullgraph=True, options={"cpp.threads": 1})
        return _compiled


class CpuGather:
    """The gather of one loader: a float32 scale, a block buffer of its own, fused or eager."""

    def __init__(self, dtype: torch.dtype, d: int, scale: float, fused: bool):
        self.dtype, self.d = dtype, d
        self.scale = float(scale)
        self.scale_t = torch.tensor(self.scale, dtype=torch.float32)  # float32 math, as eager mul_ does
        self.want_fused, self.fused = fused, False  # fused once warm() has compiled the kernel
        rows = max(1, BLOCK_BYTES // (d * (dtype.itemsize + 4)))
        self.block_ED = None if dtype == torch.float32 else torch.empty((rows, d), dtype=dtype)

    def warm(self) -> bool:
        """Compile the fused kernel now, in the calling thread (so that no producer thread ever compiles). On
        failure use the eager gather. Returns whether the fused kernel is used."""
        if not self.want_fused or self.fused:
            return self.fused
        # Sizes unlike any later call's: 0 and 1 would be specialised, and sizes that happen to be equal (rows
        # gathered, rows of data, d) tied together, each a recompile at the first real call.
        n = 3 if self.d == 2 else 2
        data = torch.zeros((max(n, self.d) + 1, self.d), dtype=self.dtype)
        try:
            _fused_kernel()(torch.empty((n, self.d)), data, torch.arange(n), self.scale_t)
            self.fused = True
        except Exception as err:  # no C++ compiler, an unsupported Python: the eager gather gives the same values
            self._give_up(err)
        return self.fused

    def _give_up(self, err: Exception) -> None:
        self.want_fused = self.fused = False
        first = (str(err).strip().splitlines() or [""])[0][:200]
        print(f"note: the fused CPU gather could not be compiled ({type(err).__name__}: {first}); "
              "using the eager gather (up to 2x slower)", file=sys.stderr)

    def __call__(self, out_RD: torch.Tensor, data_ND: torch.Tensor, idx_R: torch.Tensor) -> None:
        if self.fused and idx_R.shape[0] >= 2 and data_ND.shape[0] >= 2:
            try:
                _fused_kernel()(out_RD, data_ND, idx_R, self.scale_t)
                return
            except Exception as err:  # a recompilation that failed: the eager gather below rewrites all of out
                self._give_up(err)
        E = self.block_ED.shape[0] if self.block_ED is not None else max(1, BLOCK_BYTES // (8 * self.d))
        for i in range(0, idx_R.shape[0], E):
            o = out_RD[i:i + E]
            if self.block_ED is None:  # float32 store: gathered straight into the output
                torch.index_select(data_ND, 0, idx_R[i:i + E], out=o)
            else:
                b = self.block_ED[:o.shape[0]]
                torch.index_select(data_ND, 0, idx_R[i:i + E], out=b)
                o.copy_(b)
            if self.scale != 1.0:
                o.mul_(self.scale)


HUGE_PAGE = 2 << 20


def random_access_empty(rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised [rows, d] CPU tensor that batches are gathered from at random rows, backed by 2 MiB
    pages where Linux allows (madvise MADV_HUGEPAGE; see the module's note)."""
    nbytes = rows * d * dtype.itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty((rows, d), dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: ordinary pages
        pass
    raw = np.frombuffer(region, dtype=np.uint8)  # holds the mapping for as long as the tensor lives
    start = -raw.ctypes.data % HUGE_PAGE
    return torch.from_numpy(raw[start:start + nbytes]).view(dtype).view(rows, d)
