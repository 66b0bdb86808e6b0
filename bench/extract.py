"""Benchmark of sae-extract: pipeline images/s against a bare forward pass, and stored bytes per activation.

The bare pass runs the same model over the same DataLoader (same batches, workers, preprocessing,
hooks and token selection) and throws the activations away. The pipeline pass is the whole of
``sae-extract`` after the model is built: the same loop plus the shard buffers, the background
writer (checksums, fsync, manifest) and finalize. Passes alternate (bare, pipeline, bare, ...) so
that a noisy machine affects both; the overhead is computed per pair, and the median is reported.
The writer's own time (wall and CPU, on its thread) and finalize are clocked too: on a shared,
noisy machine they say more about the cost of writing than the difference of two wall times.

    python bench/extract.py                                   # EfficientNet-Lite0 on digits (CPU)
    python bench/extract.py --model timm:vit_tiny_patch16_224 --random-init --tokens all
    python bench/extract.py --model clip --random-init --dtype bfloat16 --batch-size 256 --limit 20480  # GPU

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from visionsae.extract import ExtractConfig
from visionsae.extract.pipeline import build_plan, forward, make_loader, run_plan, shard_batches
from visionsae.store import StoreWriter
from visionsae.store.layout import torch_dtype


def bare_pass(plan, cfg) -> float:
    """Seconds for the loader + forward + token selection over every shard, nothing kept."""
    batches = shard_batches(plan.spec, list(range(plan.spec.n_shards)), cfg.batch_size)
    t0 = time.perf_counter()
    for x_BCHW, _ok, _why in make_loader(plan, cfg, batches):
        out = forward(plan, x_BCHW)
        for rows in out.values():  # the same device-side cast the pipeline does
            rows.to(torch_dtype(cfg.dtype))
    if plan.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


class WriterClock:
    """Time spent in StoreWriter.write_shard (on the background thread) and finalize: wall and CPU.

    The wall-clock overhead of a whole pass is noisy on a shared machine; the writer's own CPU time
    is what writing takes away from the model on a CPU-only box, and it is far less noisy."""

    def __init__(self):
        self.wall = self.cpu = self.finalize = 0.0
        write, final = StoreWriter.write_shard, StoreWriter.finalize

        def timed_write(writer, *args, **kwargs):
            t, c = time.perf_counter(), time.thread_time()
            write(writer, *args, **kwargs)
            self.cpu += time.thread_time() - c
            self.wall += time.perf_counter() - t

        def timed_finalize(writer):
            t = time.perf_counter()
            final(writer)
            self.finalize += time.perf_counter() - t

        StoreWriter.write_shard, StoreWriter.finalize = timed_write, timed_finalize


def pipeline_pass(plan, cfg, clock: WriterClock) -> tuple[float, float, float, float]:
    """(pass seconds, writer wall seconds, writer CPU seconds, finalize seconds)."""
    before = (clock.wall, clock.cpu, clock.finalize)
    t0 = time.perf_counter()
    run_plan(plan, cfg)
    if plan.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return (seconds, clock.wall - before[0], clock.cpu - before[1], clock.finalize - before[2])


def store_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the activation chunk files, bytes of every file in the store)."""
    files = [f for f in path.rglob("*") if f.is_file()]
    acts = sum(f.stat().st_size for f in files if "/acts/c/" in f.as_posix())
    return acts, sum(f.stat().st_size for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--layers", default=None)
    ap.add_argument("--tokens", default=None)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--images-per-shard", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--repeats", type=int, default=2, help="bare/pipeline pairs")
    ap.add_argument("--out-dir", default=None, help="where the store is written (default: a temp dir)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        cfg = ExtractConfig(model=args.model, dataset=args.dataset, data_root=args.data_root, layers=args.layers,
                            tokens=args.tokens, dtype=args.dtype, batch_size=args.batch_size, workers=args.workers,
                            limit=args.limit, device=args.device, random_init=args.random_init,
                            weights=args.weights, images_per_shard=args.images_per_shard,
                            out=str(Path(tmp) / "bench.zarr"), mode="overwrite", progress=False)
        cfg.validate()
        plan = build_plan(cfg)
        n = plan.spec.n_images
        bare_pass(plan, cfg)  # warm-up: first-call allocations, worker start, file cache
        clock = WriterClock()
        bare, full, writes = [], [], []
        for _ in range(args.repeats):
            bare.append(bare_pass(plan, cfg))
            seconds, *writer = pipeline_pass(plan, cfg, clock)
            full.append(seconds)
            writes.append(writer)
        acts_bytes, all_bytes = store_bytes(Path(cfg.out))
        values = sum(la.tokens_per_image * la.d for la in plan.spec.layers) * n

    overhead = [f / b - 1 for b, f in zip(bare, full)]
    print(json.dumps({
        "model": plan.backbone.id, "weights": plan.backbone.weights, "dataset": args.dataset, "images": n,
        "layers": [[la.name, la.tokens_per_image, la.d] for la in plan.spec.layers], "dtype": args.dtype,
        "batch_size": args.batch_size, "workers": cfg.n_workers(), "images_per_shard": args.images_per_shard,
        "device": str(plan.device) if plan.device.type == "cpu" else torch.cuda.get_device_name(plan.device),
        "autocast": str(plan.amp_dtype) if plan.amp_dtype else None,
        "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "host": platform.machine(),
        "bare_s": [round(t, 3) for t in bare], "pipeline_s": [round(t, 3) for t in full],
        "bare_images_per_s": round(n / min(bare), 2), "pipeline_images_per_s": round(n / min(full), 2),
        "write_overhead_median": round(statistics.median(overhead), 4),
        "write_overhead_per_pair": [round(o, 4) for o in overhead],
        "writer_wall_s": [round(w[0], 3) for w in writes], "writer_cpu_s": [round(w[1], 3) for w in writes],
        "finalize_s": [round(w[2], 3) for w in writes],
        # what writing costs next to the forward pass, per pair: (writer CPU + finalize) / bare pass
        "writer_cost_fraction": [round((w[1] + w[2]) / b, 4) for w, b in zip(writes, bare)],
        "activation_values": values, "acts_bytes": acts_bytes, "store_bytes": all_bytes,
        "bytes_per_activation": round(acts_bytes / values, 4), "store_bytes_per_activation": round(all_bytes / values, 4),
    }, indent=1))


if __name__ == "__main__":
    main()
