"""Learning-rate sweep of sae-train (not a test): which default lr rule holds over run lengths and widths.

    .venv/bin/python bench/lr_sweep.py --store runs/fm6k.zarr [--expansions 0.5,1] [--steps 200,800]
        [--multiples 1,3,10] [--schedule] [--quick] [--markdown]

The store: real activations, e.g. EfficientNet-Lite0 embeddings (d = 1280) of 6,000 Fashion-MNIST images,
``sae-extract --dataset fashion-mnist --limit 6000 --dtype float32 --out runs/fm6k.zarr``. For every width
(latents = expansion x d), run length (steps) and learning rate, one Top-k model (k = 16, batch 256, no
regularizer, the trainer's own warm-up and decay) is trained with sae-train's own code and scored on the
store's held-out images (10%): FVU and the dead fraction. The lr values are multiples of the LLM-scale rule
(Gao et al.'s 2e-4 sqrt(2^14 / n), ``llm_lr``), so the table reads as "how far from that rule is best".
--schedule also varies warm-up and decay at the longest run. The defaults are sized for a 2-core CPU (about
10 minutes when the machine is not shared); on a GPU pass wider dictionaries and longer runs. Prints one JSON
object; --markdown also prints the rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from visionsae.sae import read_checkpoint
from visionsae.train import TrainConfig, train
from visionsae.train.config import llm_lr as default_lr

MULTIPLES = (1.0, 3.0, 10.0)  # lr = multiple x the LLM-scale rule


def one_run(store: str, out: Path, *, n_latents: int, steps: int, lr: float, warmup: int | None = None,
            decay_frac: float = 0.2, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    (ck,) = train(TrainConfig(store=store, out=str(out), arch=("topk",), k=(16,), n_latents=n_latents,
                              batch_size=256, steps=steps, lr=lr, warmup_steps=warmup, decay_frac=decay_frac,
                              seed=seed, val_fraction=0.1, save_every=0, log_every=10_000, progress=False,
                              overwrite=True, device="cpu"))
    m = read_checkpoint(ck)["metrics"]
    return {"n_latents": n_latents, "steps": steps, "lr": lr, "warmup": warmup, "decay_frac": decay_frac,
            "val_fvu": m["val_fvu"], "val_dead_frac": m["val_dead_frac"], "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--expansions", default="0.5,1", help="latents = expansion x d")
    ap.add_argument("--steps", default="200,800")
    ap.add_argument("--multiples", default=",".join(f"{m:g}" for m in MULTIPLES), help="lr multiples of the rule")
    ap.add_argument("--quick", action="store_true", help="one width, one length, three lrs (a smoke run)")
    ap.add_argument("--schedule", action="store_true", help="also vary warm-up and decay at the longest run")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    from visionsae.store import open_store
    st = open_store(args.store)
    d = st.layer(st.layer_names[0]).d
    expansions = [float(e) for e in args.expansions.split(",")]
    lengths = [int(s) for s in args.steps.split(",")]
    multiples = tuple(float(m) for m in args.multiples.split(","))
    if args.quick:
        expansions, lengths, multiples = expansions[:1], lengths[:1], (1.0, 4.0, 16.0)
    rows, schedule = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for e in expansions:
            n = int(round(e * d))
            for steps in lengths:
                for mult in multiples:
                    r = one_run(args.store, Path(tmp) / "r", n_latents=n, steps=steps, lr=mult * default_lr(n))
                    r["multiple"] = mult
                    rows.append(r)
                    print(json.dumps(r), flush=True)
        # warm-up and decay at the longest run and widest dictionary, at the best lr found there
        n, steps = int(round(expansions[-1] * d)), lengths[-1]
        here = [r for r in rows if r["n_latents"] == n and r["steps"] == steps]
        best = min(here, key=lambda r: r["val_fvu"])
        if args.schedule and not args.quick:
            for warmup, decay in ((steps // 20, 0.2), (steps // 10, 0.0)):
                r = one_run(args.store, Path(tmp) / "s", n_latents=n, steps=steps, lr=best["lr"], warmup=warmup,
                            decay_frac=decay)
                schedule.append(r)
                print(json.dumps(r), flush=True)
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "store": args.store, "d": d,
              "rows": rows, "schedule": schedule}
    print(json.dumps(result))
    if args.markdown:
        print("| latents | steps | lr (x rule) | lr | held-out FVU | dead % |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['n_latents']} | {r['steps']} | {r['multiple']:g} | {r['lr']:.2e} | {r['val_fvu']:.4f} | "
                  f"{100 * r['val_dead_frac']:.1f} |")
        for r in schedule:
            print(f"| {r['n_latents']} | {r['steps']} | warm-up {r['warmup']}, decay {r['decay_frac']:g} | "
                  f"{r['lr']:.2e} | {r['val_fvu']:.4f} | {100 * r['val_dead_frac']:.1f} |")


if __name__ == "__main__":
    main()
