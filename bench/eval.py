"""Benchmark of sae-eval (not a test): run `.venv/bin/python bench/eval.py [--quick]` from the repository root.

1. Monosemanticity Score: the linear-time identity against the O(N^2) definition at growing numbers
   of images N (the quadratic one only while it stays under --quad-budget seconds), same latents,
   plus the largest absolute difference between the two.
2. Evaluation throughput: held-out rows per second of a full evaluation (all metrics, k-sweep,
   MS, purity; probes off so that scikit-learn's fitting time is measured separately) of one and of
   several Top-k checkpoints in one pass, on a synthetic store of realistic width.
3. Memory against rows (``--only memory``): the peak of numpy memory (tracemalloc) and of the resident set
   (Linux VmHWM, reset before each run; it also counts the store pages read through memory maps, which the
   kernel can drop) of ``evaluate`` with probes on held-out sets growing 4x at a time, beside sae-eval's own
   estimate of what it holds (config.eval_memory), which has no row count in it.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from visionsae.evaluate import EvalConfig, evaluate
from visionsae.evaluate.monosemanticity import ms_linear, ms_quadratic
from visionsae.sae import SAEConfig, build_sae, save_checkpoint
from visionsae.store import write_array_store


def bench_ms(sizes: list[int], n_latents: int, d_embed: int, quad_budget: float) -> None:
    print(f"\n## MS: linear vs quadratic ({n_latents} latents, embeddings of width {d_embed}, ~5% firing)")
    print("| images N | linear (s) | quadratic (s) | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    quad_ok = True
    for n in sizes:
        a = rng.exponential(size=(n, n_latents)) * (rng.random((n, n_latents)) < 0.05)
        e = rng.normal(size=(n, d_embed))
        t = time.perf_counter()
        lin = ms_linear(a, e)
        t_lin = time.perf_counter() - t
        if quad_ok:
            t = time.perf_counter()
            quad = ms_quadratic(a, e)
            t_quad = time.perf_counter() - t
            diff = np.nanmax(np.abs(lin - quad))
            print(f"| {n} | {t_lin:.4f} | {t_quad:.3f} | {t_quad / t_lin:.0f}x | {diff:.1e} |")
            # the next size costs ~4x: stop before it would blow the budget
            quad_ok = 4 * t_quad < quad_budget
        else:
            print(f"| {n} | {t_lin:.4f} | (skipped) | | |")


def bench_throughput(n_rows: int, d: int, n_latents: int, k: int, n_ckpts: int, batch_rows: int) -> None:
    print(f"\n## Evaluation throughput: {n_rows} held-out rows, d = {d}, {n_latents} latents, Top-k k = {k}, "
          f"batch {batch_rows} rows")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # twice the held-out rows: the first half is the checkpoints' "training" split (probe training)
        labels = rng.integers(0, 10, 2 * n_rows)
        x = rng.normal(size=(2 * n_rows, d)).astype(np.float32)
        store = write_array_store(tmp / "store", {"emb": x}, labels, images_per_shard=4096)
        cks = []
        for i in range(n_ckpts):
            torch.manual_seed(i)
            model = build_sae(SAEConfig(arch="topk", d_in=d, n_latents=n_latents, k=k))
            path = tmp / f"c{i}" / "ckpt.pt"
            save_checkpoint(path, model, input_scale=1.0,
                            store={"path": str(store.path), "fingerprint": store.fingerprint, "layer": "emb", "d": d},
                            split={"val_slots": torch.arange(n_rows, 2 * n_rows), "val_fraction": 0.5, "seed": 0},
                            train={}, step=0, metrics={})
            cks.append(str(path))
        # warm-up (first-call costs of torch and of the store's memory maps), not timed
        evaluate(EvalConfig(cks[:1], k_sweep=(), probe_budgets=(), max_images=batch_rows, progress=False))
        # The limit: reading the rows and one plain forward of the model, nothing measured.
        model = build_sae(SAEConfig(arch="topk", d_in=d, n_latents=n_latents, k=k)).eval()
        t = time.perf_counter()
        with torch.no_grad():
            for lo in range(n_rows, 2 * n_rows, batch_rows):
                model(torch.from_numpy(store.read_rows("emb", lo, min(lo + batch_rows, 2 * n_rows))))
        limit = time.perf_counter() - t
        print(f"limit (read + forward only): {limit:.1f} s, {n_rows / limit:.0f} rows/s\n")
        print("| setting | checkpoints | wall (s) | held-out rows/s per checkpoint | x limit per checkpoint |")
        print("|---|---|---|---|---|")
        sweep = (16, 32, 64, 128)
        for label, paths, ks in (("plain metrics, MS, purity", cks[:1], ()),
                                 (f"+ k-sweep {','.join(map(str, sweep))}", cks[:1], sweep),
                                 ("+ k-sweep, all in one pass", cks, sweep)):
            cfg = EvalConfig(paths, k_sweep=ks, probe_budgets=(), device="cpu", batch_rows=batch_rows,
                             progress=False)
            t = time.perf_counter()
            evaluate(cfg)
            wall = time.perf_counter() - t
            print(f"| {label} | {len(paths)} | {wall:.1f} | {n_rows * len(paths) / wall:.0f} | "
                  f"{wall / len(paths) / limit:.1f} |")
        budgets = (1, 8, 32)
        t = time.perf_counter()
        evaluate(EvalConfig(cks[:1], k_sweep=(), probe_budgets=budgets, device="cpu", batch_rows=batch_rows,
                            probe_train_images=n_rows, progress=False))
        wall = time.perf_counter() - t
        print(f"| plain + probes at budgets {','.join(map(str, budgets))} ({n_rows} probe-training images) | 1 | "
              f"{wall:.1f} | {n_rows / wall:.0f} | {wall / limit:.1f} |")


def _rss_peak_reset() -> tuple[int, int] | None:
    """(resident-set high-water mark, resident set now) in bytes, then the mark is reset to now; None where
    /proc does not offer it."""
    try:
        status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                  if line.startswith(("VmHWM", "VmRSS"))}
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status["VmHWM"], status["VmRSS"]
    except (OSError, KeyError):
        return None


def bench_memory(images: list[int], tokens: int, d: int, n_latents: int, k: int, batch_rows: int) -> None:
    from visionsae.evaluate.config import GroupShape, eval_memory, peak_memory
    print(f"\n## Memory against rows: {tokens} tokens per image, d = {d}, {n_latents} latents, Top-k and SoftSAE "
          f"k = {k}, batch {batch_rows} rows, probes at budgets 1,8 on 1000 training images")
    print("| held-out rows | rows' bytes (MiB) | numpy peak (MiB) | RSS peak above its start (MiB) | estimate (MiB) |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    n_img = max(images) + 1000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        labels = rng.integers(0, 10, n_img)
        x = rng.normal(size=(n_img * tokens, d)).astype(np.float32)
        store = write_array_store(tmp / "store", {"tok": x}, labels, tokens_per_image=tokens, images_per_shard=512)
        del x
        rec = {"path": str(store.path), "fingerprint": store.fingerprint, "layer": "tok", "d": d}
        for n in images:
            cks = []
            for arch in ("topk", "softk"):
                from visionsae.sae.registry import resolve_config
                model = build_sae(resolve_config(arch, d, n_latents, k))
                path = tmp / f"{arch}-{n}" / "ckpt.pt"
                save_checkpoint(path, model, input_scale=1.0, store=rec, train={}, step=0, metrics={},
                                split={"val_slots": torch.arange(n), "val_fraction": 0.5, "seed": 0})
                cks.append(str(path))
            cfg = EvalConfig(cks, k_sweep=(k // 2,), probe_budgets=(1, 8), probe_train_images=1000, device="cpu",
                             batch_rows=batch_rows, progress=False)
            evaluate(cfg)  # warm-up
            gc.collect()
            start = _rss_peak_reset()
            tracemalloc.start()
            evaluate(cfg)
            numpy_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            end = _rss_peak_reset()
            rss = end[0] - start[1] if start and end else None
            shape = GroupShape([n_latents] * 2, [False, True], d, tokens, 10, d, 1000)
            est = peak_memory(eval_memory(cfg, [shape]), False)[0]
            rows = n * tokens
            print(f"| {rows} | {rows * d * 4 / 2**20:.1f} | {numpy_peak / 2**20:.1f} | "
                  f"{rss / 2**20 if rss is not None else float('nan'):.0f} | {est / 2**20:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run, ~1 minute)")
    p.add_argument("--quad-budget", type=float, default=60.0, help="seconds a quadratic MS run may take")
    p.add_argument("--only", choices=("ms", "throughput", "memory"), help="run one section")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    quick = args.quick
    if args.only in (None, "ms"):
        bench_ms([250, 500, 1000] if quick else [250, 500, 1000, 2000, 4000, 8000, 32000, 128000],
                 32, 64 if quick else 512, args.quad_budget)
    if args.only in (None, "throughput"):
        bench_throughput(*((2048, 128, 1024, 16, 2, 1024) if quick else (16384, 768, 8192, 64, 3, 2048)))
    if args.only in (None, "memory"):
        bench_memory(*(([250, 1000, 4000], 16, 64, 512, 16, 1024) if quick
                       else ([500, 2000, 8000], 16, 256, 4096, 32, 2048)))
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
