"""Benchmark of the store reader and loader against the number of shards (not a test).

    python bench/scale.py [--shards 100,1000,10000] [--markdown]

For each shard count S, a synthetic store of S shards (4 images of 1 token each, d = 16, float16) is
written with plain zarr and numpy following cache_layout.md (zarr lays out the metadata; chunk files
and manifest records are written as the spec defines them, so 10,000 shards take seconds) into a
temporary directory, and a fresh process measures:

- open: ``open_store`` (root and layer metadata);
- manifest: the first ``store.layer()``, which parses every record once and cross-checks the layer
  statistics against them;
- verify: ``store.verify()`` (every chunk's CRC);
- first batch: a new Store and streaming Loader, up to its first batch (split, manifest, first group);
- epoch: one epoch of the loader (groups of 64 shards, batch 64), with the peak of open file
  descriptors (sampled at every batch) and the process's peak RSS.

Every cost must grow at most linearly in S (per-shard columns roughly constant) and peak RSS and open
files must stay flat. Prints one JSON object (and markdown rows with --markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import synthetic_store
from synthetic_store import LAYER, Shape, ShardRows, exact_stats

IPS, T, D, GROUP, BATCH = 4, 1, 16, 64, 64


def write_store(path: Path, n_shards: int) -> None:
    """A complete float16 store of n_shards shards (random rows), by cache_layout.md."""
    rng = np.random.default_rng(0)

    def shard(s: int) -> ShardRows:
        rows_RD = rng.standard_normal((IPS * T, D)).astype(np.float16)
        return ShardRows(rows_RD, np.arange(s * IPS, (s + 1) * IPS, dtype=np.int64) % 10, *exact_stats(rows_RD))

    synthetic_store.write_store(path, Shape(n_shards, IPS, T, D), shard)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def measure(path: Path) -> dict:
    """Run in a fresh process: every figure of one store."""
    import torch

    from visionsae.store import open_store
    from visionsae.train.loader import Loader, make_split

    import zarr  # noqa: F401  (imported before the clock: a fixed cost of the process, not of the store)

    torch.set_num_threads(1)
    out = {}
    t = time.perf_counter()
    store = open_store(path)
    out["open_s"] = time.perf_counter() - t
    t = time.perf_counter()
    store.layer(LAYER)
    out["manifest_s"] = time.perf_counter() - t
    t = time.perf_counter()
    store.verify()
    out["verify_s"] = time.perf_counter() - t

    t = time.perf_counter()
    store = open_store(path)
    train, _ = make_split(store, 0.0, seed=0)
    loader = Loader(store, LAYER, train, batch_size=BATCH, seed=0, device=torch.device("cpu"), scale=1.0,
                    preload=False, buffer_bytes=1, group_shards=GROUP)
    it = loader.batches(0)
    next(it)
    out["first_batch_s"] = time.perf_counter() - t
    steps = loader.n_rows // BATCH
    fds = open_fds()
    t = time.perf_counter()
    for _ in range(steps - 1):
        next(it)
        fds = max(fds, open_fds())
    out["epoch_s"] = time.perf_counter() - t
    loader.close()
    out["epoch_rows_per_s"] = (steps - 1) * BATCH / out["epoch_s"]
    out["peak_open_fds"] = fds
    out["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="100,1000,10000")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for S in [int(v) for v in args.shards.split(",")]:
            path = Path(tmp) / f"s{S}.zarr"
            t = time.perf_counter()
            write_store(path, S)
            write_s = time.perf_counter() - t
            child = subprocess.run([sys.executable, __file__, "--measure", str(path)], capture_output=True,
                                   text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows.append({"shards": S, "write_s": write_s, **json.loads(child.stdout.strip().splitlines()[-1])})
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.markdown:
        print("\n| shards | open (ms) | manifest + stats check (ms) | verify all (ms) | first batch (ms) | "
              "epoch (ms) | verify per shard (µs) | epoch per shard (µs) | peak open fds | peak RSS (MiB) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            S = r["shards"]
            print(f"| {S} | {r['open_s'] * 1e3:.1f} | {r['manifest_s'] * 1e3:.0f} | {r['verify_s'] * 1e3:.0f} | "
                  f"{r['first_batch_s'] * 1e3:.0f} | {r['epoch_s'] * 1e3:.0f} | {r['verify_s'] / S * 1e6:.0f} | "
                  f"{r['epoch_s'] / S * 1e6:.0f} | {r['peak_open_fds']} | {r['peak_rss_MiB']:.0f} |")


if __name__ == "__main__":
    main()
