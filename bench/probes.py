"""Benchmark of the small-budget probe fit (not a test): all latent columns against only the columns some
training image uses, which is what visionsae.evaluate.probes.run_probes fits (same predictions).

    .venv/bin/python bench/probes.py TRAIN_STORE TEST_STORE LAYER CKPT [CKPT ...] [--images 10000] [--rounds 2]

Codes of up to --images train and test images (rows of a one-token layer), the m largest latents per image,
scikit-learn's logistic regression timed both ways in alternating rounds; prints accuracy to show it is equal.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from visionsae.evaluate import probes
from visionsae.sae import load_checkpoint
from visionsae.store import open_store


def codes(model, store, layer: str, slots: np.ndarray, m: int):
    top = probes.TopCodes(m)
    with torch.no_grad():
        out = model(torch.from_numpy(store.read_slots(layer, slots)))
    top.update_rows(out.acts_BK, out.idx_BK)
    return top.result()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("train_store")
    ap.add_argument("test_store")
    ap.add_argument("layer")
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--budgets", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    train, test = open_store(args.train_store), open_store(args.test_store)
    rng = np.random.default_rng(0)
    tr = np.sort(rng.choice(train.n_images, min(args.images, train.n_images), replace=False))
    te = np.sort(rng.choice(test.n_images, min(args.images, test.n_images), replace=False))
    print(f"# {platform.machine()}, {torch.get_num_threads()} torch threads, {len(tr)} train / {len(te)} test images")
    print("| checkpoint | m | columns used / latents | all columns (s) | used columns (s) | speed-up | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for path in args.checkpoints:
        model, _ = load_checkpoint(path)
        n = model.cfg.n_latents
        c_tr, c_te = codes(model, train, args.layer, tr, max(budgets)), codes(model, test, args.layer, te, max(budgets))
        for m in budgets:
            x_tr, x_te = probes.budget_matrix(*c_tr, m, n), probes.budget_matrix(*c_te, m, n)
            used = np.unique(x_tr.indices)
            full, cut = [], []
            for _ in range(args.rounds):
                t = time.perf_counter()
                a = probes.fit_score(x_tr, train.labels[tr], x_te, test.labels[te], 0)
                full.append(time.perf_counter() - t)
                t = time.perf_counter()
                b = probes.fit_score(x_tr[:, used], train.labels[tr], x_te[:, used], test.labels[te], 0)
                cut.append(time.perf_counter() - t)
            acc = f"{a['accuracy']:.4f}" + ("" if a["accuracy"] == b["accuracy"] else f" vs {b['accuracy']:.4f}")
            print(f"| {path} | {m} | {used.size} / {n} | {min(full):.2f} | {min(cut):.2f} | "
                  f"{min(full) / min(cut):.2f} | {acc} |", flush=True)


if __name__ == "__main__":
    main()
