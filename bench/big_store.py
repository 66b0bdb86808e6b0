"""sae-train and sae-eval on a store larger than the machine's memory (not a test).

    python bench/big_store.py --dir /path/with/40GB/free [--gib 32] [--markdown] [--keep]

Writes a synthetic float16 store of ViT-B/16 shape (197 tokens x d = 768 per image, 1024 images per
shard) of about --gib GiB with bench/synthetic_store.py, plus a sibling store of another split whose
chunk files are hard links to the first's (no extra disk), then runs, each in its own process:

1. ``sae-train`` for one epoch over every training row (--val-fraction 0.01) on the CPU;
2. ``sae-eval`` of that checkpoint on the sibling, i.e. on every image of the store (MS on the layer's own
   image vectors, purity, top images, probes trained on the first store).

For each it reports the wall time, rows/s and the peak memory of the process: the peak of its anonymous
resident memory (RssAnon, sampled every 0.2 s: what the process allocated, as opposed to page-cache
pages of the files it maps, which the kernel reclaims) and the kernel's ru_maxrss. The claim is that
both stay far below the store's size and the machine's memory. Rows of the store: each image draws
its tokens from a fixed pool of sparse combinations of 1,024 random unit directions, those of its class
(class = primary direction mod 10), so the SAE has structure to find and the probes have labels to fit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

import synthetic_store
from synthetic_store import LAYER, Shape, ShardRows

T, D, IPS, N_CLASSES = 197, 768, 1024, 10
POOL, ATOMS, ACTIVE = 65536, 1024, 8


def pool_rows(seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """POOL float16 rows, each a sum of ACTIVE random directions with positive weights, and per class the
    pool rows whose primary (largest-weight) direction belongs to it."""
    rng = np.random.default_rng(seed)
    atoms_AD = rng.standard_normal((ATOMS, D)).astype(np.float32)
    atoms_AD /= np.linalg.norm(atoms_AD, axis=1, keepdims=True)
    which_PK = rng.integers(0, ATOMS, (POOL, ACTIVE))
    weight_PK = rng.exponential(1.0, (POOL, ACTIVE)).astype(np.float32)
    rows_PD = np.einsum("pk,pkd->pd", weight_PK, atoms_AD[which_PK]).astype(np.float16)
    primary_P = which_PK[np.arange(POOL), weight_PK.argmax(1)]
    return rows_PD, [np.flatnonzero(primary_P % N_CLASSES == c) for c in range(N_CLASSES)]


def shard_maker(seed: int = 0):
    rows_PD, by_class = pool_rows(seed)
    r64 = rows_PD.astype(np.float64)
    sq_P = (r64 ** 2).sum(1)

    def shard(s: int) -> ShardRows:
        rng = np.random.default_rng([seed, s])
        labels_I = rng.integers(0, N_CLASSES, IPS)
        pick_R = np.empty(IPS * T, dtype=np.int64)
        for c in range(N_CLASSES):
            rows = (np.flatnonzero(labels_I == c)[:, None] * T + np.arange(T)).reshape(-1)
            pick_R[rows] = by_class[c][rng.integers(0, by_class[c].size, rows.size)]
        # Statistics from the pool, exactly: each row is a copy of a pool row, so sums are count-weighted.
        count_P = np.bincount(pick_R, minlength=POOL).astype(np.float64)
        return ShardRows(rows_PD[pick_R], labels_I, count_P @ r64, float(count_P @ sq_P))

    return shard


class PeakMemory:
    """Samples /proc/<pid>/status of a running process: the peak RssAnon (MiB)."""

    def __init__(self, pid: int):
        self.pid, self.peak_anon_MiB, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.peak_anon_MiB = max(self.peak_anon_MiB, int(line.split()[1]) / 1024)
            except (FileNotFoundError, ProcessLookupError):
                return
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` (output to ``log``); its wall time, peak RssAnon and ru_maxrss."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        mem = PeakMemory(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        mem.stop()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:2])} failed (exit {proc.returncode}); see {log}")
    return {"wall_s": wall, "peak_rss_anon_MiB": mem.peak_anon_MiB, "ru_maxrss_MiB": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def mem_total_GiB() -> float:
    line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal:"))
    return int(line.split()[1]) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="Folder for the stores and runs (needs --gib GiB free).")
    ap.add_argument("--gib", type=float, default=32.0, help="Store size in GiB (default 32).")
    ap.add_argument("--n-latents", type=int, default=256)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--keep", action="store_true", help="Keep the stores (default: removed at the end).")
    ap.add_argument("--stages", default="write,train,eval", help="Stages to run; the others' figures are read "
                    "from DIR/result.json of an earlier run with --keep (e.g. --stages eval after a fix).")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    shard_bytes = IPS * T * D * 2
    shape = Shape(max(1, round(args.gib * 2**30 / shard_bytes)), IPS, T, D)
    free = shutil.disk_usage(root).free
    train_store, test_store = root / "train.zarr", root / "test.zarr"
    need = shape.n_shards * shard_bytes * 1.02
    if not train_store.exists() and free < need:
        sys.exit(f"error: {root} has {free / 2**30:.1f} GiB free, the store needs {need / 2**30:.1f} GiB: "
                 "free space or lower --gib")
    bin_dir = Path(sys.executable).parent
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {mem_total_GiB():.1f} GiB memory",
              "date": time.strftime("%Y-%m-%d"), "store_GiB": shape.n_shards * shard_bytes / 2**30,
              "n_shards": shape.n_shards, "n_images": shape.n_images, "rows": shape.n_images * T, "d": D}
    stages = set(args.stages.split(","))
    earlier = json.loads((root / "result.json").read_text()) if (root / "result.json").exists() else {}
    if "write" in stages:
        t = time.perf_counter()
        for path in (train_store, test_store):
            if path.exists():
                shutil.rmtree(path)
        synthetic_store.write_store(train_store, shape, shard_maker())
        result["write_s"] = time.perf_counter() - t
        sibling = Shape(shape.n_shards, IPS, T, D, split="test")
        synthetic_store.write_store(test_store, sibling, lambda s: None, link_from=train_store)
    else:
        result["write_s"] = earlier["write_s"]

    # One torch thread: on a shared machine a descheduled OpenMP thread stalls every parallel op (a CPU
    # torch.sort of 65,536 indices took 366 ms with 2 threads under load against 10 ms with 1).
    env_cmd = ["env", "OMP_NUM_THREADS=1"]
    run_dir = root / "run"
    train_rows = int(shape.n_images * 0.99) * T
    if "train" in stages:
        result["train"] = run_measured(
            [*env_cmd, str(bin_dir / "sae-train"), "--store", str(train_store), "--layer", LAYER, "--device", "cpu",
             "--threads", "1", "--n-latents", str(args.n_latents), "--k", str(args.k), "--batch-size",
             str(args.batch_size), "--epochs", "1", "--val-fraction", "0.01", "--quiet", "--overwrite", "--out",
             str(run_dir)], root / "train.log")
        result["train"]["rows_per_s"] = train_rows / result["train"]["wall_s"]
        (root / "result.json").write_text(json.dumps({**earlier, **result}, indent=1))  # a later --stages eval reads it
    else:
        result["train"] = earlier["train"]
    if "eval" in stages:
        result["eval"] = run_measured(
            [*env_cmd, str(bin_dir / "sae-eval"), str(run_dir), "--store", str(test_store), "--device", "cpu",
             "--k-sweep", "", "--quiet", "--out", str(root / "report")], root / "eval.log")
        result["eval"]["rows_per_s"] = shape.n_images * T / result["eval"]["wall_s"]
        report = json.loads((root / "report" / "report.json").read_text())["checkpoints"][0]
        result["eval"]["fvu"] = report["reconstruction"]["fvu"]
    else:
        result["eval"] = earlier["eval"]
    (root / "result.json").write_text(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(train_store)
        shutil.rmtree(test_store)
    print(json.dumps(result, indent=1))
    if args.markdown:
        print(f"\nStore: {result['store_GiB']:.1f} GiB, {shape.n_shards} shards, {shape.n_images:,} images x {T} "
              f"tokens x d = {D} (float16); machine memory {mem_total_GiB():.1f} GiB; written in "
              f"{result['write_s']:.0f} s.\n")
        print("| command | rows | wall (s) | rows/s | CPU (s) | peak RssAnon (MiB) | ru_maxrss (MiB) |")
        print("|---|---|---|---|---|---|---|")
        for name, rows in (("train", train_rows), ("eval", shape.n_images * T)):
            r = result[name]
            print(f"| sae-{name} | {rows:,} | {r['wall_s']:.0f} | {r['rows_per_s']:,.0f} | {r['cpu_s']:.0f} | "
                  f"{r['peak_rss_anon_MiB']:,.0f} | {r['ru_maxrss_MiB']:,.0f} |")


if __name__ == "__main__":
    main()
