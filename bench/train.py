"""Benchmark of sae-train (not a test): `.venv/bin/python bench/train.py [--device cuda] [--quick]`.

Prints one JSON object (and, with --markdown, table rows for BENCHMARKS.md):

1. Training step (Top-k, the real optimiser step: forward, AuxK off, backward, decoder projection, clipping,
   fused Adam, renormalisation) per shape: rows/s, and its time against two floors measured in the same run
   on the same shapes: ONE encoder matmul x @ W_enc^T (irreducible: every input meets every latent once)
   and three (what a dense forward + backward costs). Also the speed-up over a dense reference (Top-k
   values scattered into a zero B x n matrix multiplied by the whole decoder) and the step with both
   regularizers on.
2. Loader: rows/s of the shuffled streaming loader (first epoch: with shard checksums; steady state:
   epochs 2-3) and of the preloaded loader, with the fused and the eager CPU gather, against a raw
   sequential read of the same bytes from the same (page-cached) files in the same interleaved rounds, and
   against the rows/s the step consumes. `--loader-only` skips the step.
3. `--variants`: each variant's step; `--decode`: decoding K latents per row by gathered rows against one dense
   matmul, over K / N (where ``gather_decode`` switches); `--lapsum`: SoftSAE's soft top-k with every row sorted
   against only the top 2 k_max + 1.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visionsae.sae import SAEConfig
from visionsae.sae.topk import TopKSAE
from visionsae.store import open_store, write_array_store
from visionsae.train.config import RunSpec, default_lr
from visionsae.train.gather import CpuGather
from visionsae.train.loader import Loader
from visionsae.train.training_run import Run


class DenseDecodeTopK(TopKSAE):
    """The reference: the same model, decoding through a dense B x n code."""

    def decode(self, acts_BK, idx_BK):
        return self.dense_code(acts_BK, idx_BK) @ self.W_dec + self.b_dec


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):  # best of reps: the least disturbed by other processes on a shared machine
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def _batch_and_matmul(d: int, n: int, B: int, device: torch.device):
    """(autocast dtype, the fixed batch, the limit: one encoder matmul x @ W_enc^T of the same shape)."""
    autocast = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    x_BD = torch.randn(B, d, device=device)
    W_ND = torch.randn(n, d, device=device) / d ** 0.5

    def matmul():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast is not None):
            F.linear(x_BD, W_ND)
    return autocast, x_BD, matmul


def _interleaved_best(fns: dict, device: torch.device, warmup: int, reps: int) -> dict[str, float]:
    """Rounds that time every function once, best of the rounds: load from other processes on a shared
    machine then hits all of them alike instead of whichever happened to run during a busy spell."""
    best = {label: float("inf") for label in fns}
    for r in range(warmup + reps):
        for label, fn in fns.items():
            t = _time(fn, device, 0, 1)
            if r >= warmup:
                best[label] = min(best[label], t)
    return best


def bench_step(d: int, n: int, k: int, B: int, device: torch.device, warmup: int, reps: int) -> dict:
    autocast, x_BD, matmul = _batch_and_matmul(d, n, B, device)
    fns = {"encoder_matmul": matmul}
    for label, cls, reg in (("step", TopKSAE, "none"), ("dense_step", DenseDecodeTopK, "none"),
                            ("step_reg_both", TopKSAE, "both")):
        torch.manual_seed(0)
        model = cls(SAEConfig("topk", d, n, k)).to(device)
        run = Run(RunSpec("topk", k, reg, 1e-5, 1e-3), model, lr=default_lr(n), variance=float(d),
                  dead_rows=1 << 62, auxk_coeff=0.0, grad_clip=1.0, world=1, autocast_dtype=autocast)
        counter = iter(range(1 << 30))
        fns[label] = lambda run=run, counter=counter: run.train_step(x_BD, next(counter), 1 << 30, 1.0)
    best = _interleaved_best(fns, device, warmup, reps)
    out = {"d": d, "n_latents": n, "k": k, "batch": B, **{f"{label}_s": t for label, t in best.items()}}
    out["floor_s"] = 3 * out["encoder_matmul_s"]
    out["rows_per_s"] = B / out["step_s"]
    out["step_over_floor"] = out["step_s"] / out["floor_s"]
    out["step_over_one_matmul"] = out["step_s"] / out["encoder_matmul_s"]
    out["dense_over_step"] = out["dense_step_s"] / out["step_s"]
    return out


# (label, arch, where in a run of VARIANT_RUN steps the timed steps sit): SoftSAE's step differs by phase.
VARIANTS = (("topk", "topk", 0.5), ("batchtopk", "batchtopk", 0.5), ("relu", "relu", 0.5),
            ("softk, soft phase", "softk", 0.5), ("softk, hard phase", "softk", 0.95))
VARIANT_RUN = 10_000


def bench_variants(d: int, n: int, k: int, B: int, device: torch.device, warmup: int, reps: int) -> dict:
    """Each variant's whole training step (trainer defaults, no regularizer) on one batch, in interleaved
    rounds, against the Top-k step and one encoder matmul of the same run."""
    from visionsae.sae import build_sae
    from visionsae.sae.registry import resolve_config

    autocast, x_BD, matmul = _batch_and_matmul(d, n, B, device)
    fns = {"encoder_matmul": matmul}
    for label, arch, where in VARIANTS:
        torch.manual_seed(0)
        # variance fraction 0.3: about what image embeddings leave after centring (SoftSAE's default weight)
        model = build_sae(resolve_config(arch, d, n, k, variance_fraction=0.3)).to(device)
        run = Run(RunSpec(arch, k, "none", 0.0, 0.0), model, lr=default_lr(n), variance=float(d),
                  dead_rows=1 << 62, auxk_coeff=1 / 32, grad_clip=1.0, world=1, autocast_dtype=autocast)
        first = int(where * VARIANT_RUN)
        counter = iter(range(first, VARIANT_RUN))
        fns[label] = lambda run=run, counter=counter: run.train_step(x_BD, next(counter), VARIANT_RUN, 1.0)
    best = _interleaved_best(fns, device, warmup, reps)
    out = {"d": d, "n_latents": n, "k": k, "batch": B, "encoder_matmul_s": best.pop("encoder_matmul")}
    out["variants"] = {label: {"step_s": t, "over_topk": t / best["topk"],
                               "over_one_matmul": t / out["encoder_matmul_s"]}
                       for label, t in best.items()}
    return out


DECODE_SHAPES = ((1024, 2560, 1280, (16, 64, 160, 320, 640)), (4096, 1536, 192, (16, 96, 192)),
                 (1024, 8192, 768, (32, 256, 384, 1024)))  # (B, N, D, Ks): the experiment's layers and a ViT-B


def bench_decode(B: int, N: int, D: int, ks, device: torch.device, warmup: int, reps: int) -> list[dict]:
    """Decoding K latents per row, forward + backward, both ways ``gather_decode`` can: gathered rows
    (embedding_bag) and the code scattered into B x N times the decoder (one matmul); which it picks."""
    from visionsae.sae.dictionary import DENSE_DECODE_DIVISOR

    torch.manual_seed(0)
    W_ND = torch.randn(N, D, device=device, requires_grad=True)
    g_BD = torch.randn(B, D, device=device)
    out = []
    for K in ks:
        idx_BK = torch.stack([torch.randperm(N, device=device)[:K] for _ in range(B)])
        acts_BK = torch.rand(B, K, device=device, requires_grad=True)

        def gathered():
            F.embedding_bag(idx_BK, W_ND, per_sample_weights=acts_BK, mode="sum").backward(g_BD)

        def dense():
            (acts_BK.new_zeros(B, N).scatter_add(1, idx_BK, acts_BK) @ W_ND).backward(g_BD)
        best = _interleaved_best({"gathered": gathered, "dense": dense}, device, warmup, reps)
        out.append({"B": B, "N": N, "D": D, "K": K, "gathered_s": best["gathered"], "dense_s": best["dense"],
                    "gathered_over_dense": best["gathered"] / best["dense"],
                    "picked": "dense" if K * DENSE_DECODE_DIVISOR >= N else "gathered"})
    return out


LAPSUM_SHAPES = ((1024, 1536, 16), (1024, 2560, 16), (4096, 16384, 32))  # (B, N, k): the experiment's, a ViT-B's


def bench_lapsum(B: int, N: int, k: int, device: torch.device, warmup: int, reps: int) -> dict:
    """SoftSAE's soft top-k (LapSum mask, forward + backward) at its training temperature and k^ <= k_max = 2k:
    every row sorted (no bound) against only its top 2 k_max + 1 sorted (``k_bound=k_max``, what SoftSAE
    passes)."""
    from visionsae.sae.lapsum import soft_topk_mask

    torch.manual_seed(0)
    h_BN = (torch.randn(B, N, device=device).relu() * 3).requires_grad_()
    k_B = (torch.rand(B, device=device) * (2 * k - 1) + 1).requires_grad_()

    def run(bound):
        soft_topk_mask(h_BN, k_B, 1e-4, k_bound=bound).sum().backward()
    best = _interleaved_best({"sorted": lambda: run(None), "bounded": lambda: run(2.0 * k)}, device, warmup, reps)
    return {"B": B, "N": N, "k_max": 2 * k, "sorted_s": best["sorted"], "bounded_s": best["bounded"],
            "sorted_over_bounded": best["sorted"] / best["bounded"]}


def bench_loader(rows: int, d: int, dtype: str, batch: int, device: torch.device, rounds: int,
                 buffer_mb: int = 64) -> dict:
    """The loader's rows/s against a raw sequential read of the same bytes, in interleaved rounds (best of each).

    Raw read: every chunk file of the store once, page-cached (read once before timing, as the loader finds
    them), sequentially, on one thread; two ways, and the faster is the reference: ``readinto`` a preallocated
    buffer of the store's size (what the loader's group buffer is) and ``np.fromfile`` (a fresh buffer per file,
    which malloc recycles while it is still in cache). Loader: a fresh Store per round, so epoch 1 reads and
    CRC-checks every shard; steady state is epochs 2 and 3 (best), where every shard is verified. Streaming
    uses ``buffer_mb`` groups (several per epoch: it reads each shard into a group buffer every epoch);
    preloaded reads the store once. The scale is sae-train's (sqrt(d / mean squared norm)), so the gather
    scales as in training. On the CPU both gathers run: fused (compiled one-pass kernel, compiled before the
    timing) and eager (blocks of rows)."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.zarr"
        ips = 8192
        x = np.empty((rows, d), np.float32)
        for i in range(0, rows, 1 << 16):  # in slices: fewer temporaries
            x[i:i + (1 << 16)] = rng.standard_normal((min(1 << 16, rows - i), d), dtype=np.float32)
        write_array_store(path, {"blk": x}, images_per_shard=ips, dtype=dtype)
        del x
        info = open_store(path).layer("blk")
        scale = math.sqrt(info.d / info.mean_sq_norm)
        files = sorted((path / "layers" / "blk" / "acts" / "c").glob("*/0"), key=lambda f: int(f.parent.name))
        nbytes = rows * d * (4 if dtype == "float32" else 2)
        into = np.empty(nbytes, np.uint8)

        def raw_into():
            view, at = memoryview(into), 0
            for f in files:
                with open(f, "rb", buffering=0) as fh:
                    at += fh.readinto(view[at:])

        def raw_fromfile():
            for f in files:
                np.fromfile(f, dtype=np.uint8)

        raw_into()  # warm the page cache, as the loader below will find it
        gathers = [None] if device.type == "cuda" else [True, False]
        if device.type == "cpu":  # compile once, outside the timing (per process, as in a training run)
            torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
            CpuGather(torch_dtype, d, scale, True).warm()
        variants = [(f"{mode}{'' if g is None else '_fused' if g else '_eager'}", mode == "preload", g)
                    for mode in ("stream", "preload") for g in gathers]
        steps = rows // batch
        train = np.arange(rows)
        best: dict[str, float] = {}

        def keep(label, seconds):
            best[label] = min(best.get(label, float("inf")), seconds)

        for _ in range(rounds):
            for label, fn in (("raw_readinto", raw_into), ("raw_fromfile", raw_fromfile)):
                keep(label, _time(fn, torch.device("cpu"), 0, 1))
            for label, preload, fused in variants:
                loader = Loader(open_store(path), "blk", train, batch_size=batch, seed=0, device=device,
                                scale=scale, preload=preload, buffer_bytes=buffer_mb << 20, prefetch=4,
                                fused_gather=fused)
                it = loader.batches(0)
                for epoch in (1, 2, 3):
                    t = time.perf_counter()
                    for _ in range(steps):
                        next(it)
                    _sync(device)
                    keep(f"{label}_epoch{min(epoch, 2)}", time.perf_counter() - t)
                loader.close()
        raw = min(best["raw_readinto"], best["raw_fromfile"])
        out = {"rows": rows, "d": d, "dtype": dtype, "batch": batch, "bytes": nbytes, "scale": scale,
               "buffer_mb": buffer_mb, "rounds": rounds, "raw_rows_per_s": rows / raw,
               "raw_GBps": nbytes / raw / 1e9,
               "raw_readinto_rows_per_s": rows / best["raw_readinto"],
               "raw_fromfile_rows_per_s": rows / best["raw_fromfile"]}
        for label, _, _ in variants:
            for epoch in (1, 2):
                dt = best[f"{label}_epoch{epoch}"]
                out[f"{label}_epoch{epoch}_rows_per_s"] = steps * batch / dt
                out[f"{label}_epoch{epoch}_over_raw"] = steps * batch / dt / (rows / raw)
        for g in gathers if device.type == "cpu" else []:
            suffix = "_fused" if g else "_eager"
            # Streaming reads every byte (a copy as costly as the raw read) and then gathers it (the preloaded
            # loader's work): when the two cannot overlap (one free core), its ceiling is 1 / (1 + raw / gather).
            pre = out[f"preload{suffix}_epoch2_rows_per_s"]
            out[f"stream{suffix}_one_core_ceiling_over_raw"] = pre / (pre + out["raw_rows_per_s"])
        return out


def _emit(rows: list[dict], markdown: bool, header: list[str], cells) -> None:
    """The rows as JSON, then (``markdown``) a table with ``cells(row)``'s lines under ``header``."""
    print(json.dumps(rows, indent=1))
    if markdown:
        print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for r in rows:
            for line in cells(r):
                print("| " + " | ".join(map(str, line)) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes only (about a minute on 2 CPU cores)")
    ap.add_argument("--reps", type=int, default=5, help="rounds of the step bench and of the loader bench")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--loader-only", action="store_true", help="only the loader against the raw read")
    ap.add_argument("--variants", action="store_true", help="only each variant's step against Top-k's and one "
                    "encoder matmul (the shapes of --quick or all)")
    ap.add_argument("--decode", action="store_true", help="only the gathered against the dense decode over "
                    "K / N (where gather_decode switches)")
    ap.add_argument("--lapsum", action="store_true", help="only SoftSAE's soft top-k, every row sorted against "
                    "the top 2 k_max + 1")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.lapsum:
        rows = [bench_lapsum(B, N, k, device, 1, args.reps) for B, N, k in LAPSUM_SHAPES]
        _emit(rows, args.markdown, ["B", "N", "k_max", "every row sorted (ms)", "top 2 k_max + 1 sorted (ms)",
                                    "sorted / bounded"],
              lambda r: [[r["B"], r["N"], r["k_max"], f"{1e3 * r['sorted_s']:.1f}", f"{1e3 * r['bounded_s']:.1f}",
                          f"{r['sorted_over_bounded']:.2f}"]])
        return
    if args.decode:
        rows = [r for B, N, D, ks in DECODE_SHAPES for r in bench_decode(B, N, D, ks, device, 1, args.reps)]
        _emit(rows, args.markdown, ["B", "N", "D", "K", "K / N", "gathered (ms)", "dense (ms)", "gathered / dense",
                                    "gather_decode picks"],
              lambda r: [[r["B"], r["N"], r["D"], r["K"], f"{r['K'] / r['N']:.3f}", f"{1e3 * r['gathered_s']:.1f}",
                          f"{1e3 * r['dense_s']:.1f}", f"{r['gathered_over_dense']:.2f}", r["picked"]]])
        return
    shapes = [(256, 2048, 32, 1024)]
    if not args.quick:
        shapes.append((768, 16384, 32, 4096))
    if args.variants:
        rows = [bench_variants(d, n, k, B, device, warmup=1, reps=args.reps) for d, n, k, B in shapes]
        _emit(rows, args.markdown, ["d", "latents", "k", "batch", "variant", "step (s)", "/ Top-k step",
                                    "/ 1 enc. matmul"],
              lambda r: [[r["d"], r["n_latents"], r["k"], r["batch"], label, f"{v['step_s']:.3f}",
                          f"{v['over_topk']:.2f}", f"{v['over_one_matmul']:.2f}"]
                         for label, v in r["variants"].items()])
        return
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__,
              "steps": [] if args.loader_only else
              [bench_step(d, n, k, B, device, warmup=1, reps=args.reps) for d, n, k, B in shapes],
              "loader": bench_loader(rows=1 << 17 if args.quick else 1 << 18, d=768, dtype="float16",
                                     batch=4096, device=device, rounds=args.reps)}
    print(json.dumps(result, indent=1))
    if not args.markdown:
        return
    if result["steps"]:
        print("\n| d | latents | k | batch | step (s) | rows/s | step / 1 enc. matmul | step / 3 enc. matmuls | "
              "dense / step | step with both regs (s) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for s in result["steps"]:
            print(f"| {s['d']} | {s['n_latents']} | {s['k']} | {s['batch']} | {s['step_s']:.3f} | "
                  f"{s['rows_per_s']:.0f} | {s['step_over_one_matmul']:.2f} | {s['step_over_floor']:.2f} | "
                  f"{s['dense_over_step']:.2f} | {s['step_reg_both_s']:.3f} |")
    lo = result["loader"]
    print(f"\nLoader: {lo['rows']} rows x {lo['d']} {lo['dtype']}, batch {lo['batch']}, {lo['buffer_mb']} MB "
          f"streaming groups, scale {lo['scale']:.4f}, {result['machine']}, best of {lo['rounds']} "
          "interleaved rounds\n")
    into = lo["raw_readinto_rows_per_s"]
    print("| | rows/s | / raw read (the faster of the two) | / raw readinto a preallocated buffer |")
    print("|---|---|---|---|")
    for what, key in (("raw sequential read, readinto a preallocated buffer", "raw_readinto_rows_per_s"),
                      ("raw sequential read, np.fromfile", "raw_fromfile_rows_per_s")):
        print(f"| {what} | {lo[key]:,.0f} | {lo[key] / lo['raw_rows_per_s']:.2f} | {lo[key] / into:.2f} |")
    for key in [k[:-len("_epoch1_rows_per_s")] for k in lo if k.endswith("_epoch1_rows_per_s")]:
        for epoch, what in ((1, "epoch 1 (every shard CRC-checked)"), (2, "steady state (epochs 2-3)")):
            rate = lo[f"{key}_epoch{epoch}_rows_per_s"]
            print(f"| {key.replace('_', ', ')}, {what} | {rate:,.0f} | {rate / lo['raw_rows_per_s']:.2f} | "
                  f"{rate / into:.2f} |")
        if f"{key}_one_core_ceiling_over_raw" in lo:
            print(f"| {key.replace('_', ', ')}: ceiling when read and gather share one core | | "
                  f"{lo[f'{key}_one_core_ceiling_over_raw']:.2f} | |")
    if result["steps"]:
        print(f"| the Top-k step consumes (last shape above) | {result['steps'][-1]['rows_per_s']:,.0f} | | |")


if __name__ == "__main__":
    main()
