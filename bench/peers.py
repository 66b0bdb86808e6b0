"""The Top-k training step against other SAE libraries' (not a test):
`.venv/bin/python bench/peers.py [--envs DIR] [--rounds N] [--d 768 --n-latents 16384 --k 32 --batch 4096]
[--impls visionsae,sparsify,...] [--markdown]`.

Each implementation builds its own Top-k SAE and performs its own trainer's step (see bench/peer_workers.py
for what each step contains and which peer function does what) on the same seeded random batch, in its own
process, on ONE thread; in the same process it times one encoder matmul of the same shape (x @ W_enc^T,
B x d x n), the limit no step can beat. Rounds interleave the implementations (visionsae, sparsify, SAELens,
overcomplete, dictionary_learning, then again) so that load from other processes on a shared machine hits
them alike; the report is the best CPU time (time.process_time) over the rounds of the step and of the
matmul, and their ratio (also the wall-clock times). Prints JSON, and a markdown table with --markdown.

The peers (eai-sparsify, sae-lens, overcomplete, dictionary-learning) are installed from PyPI by this script,
each into its own virtual environment under --envs (default bench/.peer-envs, git-ignored; an existing one
is reused), never into the project's environment. Each peer environment sees the site-packages of the
interpreter running this script AFTER its own (a .pth file), so pip counts the project's torch as installed
and does not download it again, and every implementation runs the same torch build. None of the four pins
an incompatible torch (checked with `pip install --dry-run`), so no --no-deps install is needed. One extra
pin: overcomplete imports its visualisation module at import time and calls `matplotlib.cm.get_cmap`, which
matplotlib 3.9 removed, without declaring matplotlib; its environment gets `matplotlib<3.9`.

A peer that cannot be installed or built is reported as "not measured: <why>", never dropped or guessed.
This script needs PyPI for the first run, so `make bench` does not run it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "bench" / "peer_workers.py"
# implementation -> what pip installs into its environment (visionsae runs in the project's environment)
PEERS = {"sparsify": ["eai-sparsify"], "saelens": ["sae-lens"],
         "overcomplete": ["overcomplete", "matplotlib<3.9"], "dictionary_learning": ["dictionary-learning"]}
ORDER = ["visionsae", *PEERS]
LABELS = {"visionsae": "visionsae", "sparsify": "EleutherAI sparsify", "saelens": "SAELens",
          "overcomplete": "overcomplete", "dictionary_learning": "dictionary_learning"}


class NotMeasured(Exception):
    """Why an implementation has no figure (install or build failure); the report shows the reason."""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    return lines[-1][:200] if lines else "no output"


def ensure_env(envs: Path, name: str, packages: list[str]) -> Path:
    """The python of `name`'s environment, created and installed if missing; reused when its marker
    (the package list it was installed with) matches."""
    env = envs / name
    python = env / "bin" / "python"
    marker = env / "installed.json"
    if python.exists() and marker.exists() and json.loads(marker.read_text()) == packages:
        return python
    venv.EnvBuilder(with_pip=True, clear=env.exists()).create(env)
    site = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    host = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    # A .pth line is appended to sys.path after the environment's own site-packages: its packages win,
    # the host's torch (and whatever else the peer does not pin) fills in.
    (site / "_host_site_packages.pth").write_text("".join(f"{p}\n" for p in host))
    log = env / "install.log"
    print(f"installing {' '.join(packages)} into {env} (log: {log})", file=sys.stderr, flush=True)
    with open(log, "w") as fh:
        rc = subprocess.call([str(python), "-m", "pip", "install", "--disable-pip-version-check", *packages],
                             stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        raise NotMeasured(f"pip install {' '.join(packages)} failed: {_last_line(log.read_text())}")
    marker.write_text(json.dumps(packages))
    return python


class Worker:
    """One implementation's process: built once, then timed once per round."""

    def __init__(self, impl: str, python: Path, shape: argparse.Namespace, log: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        if shape.device == "cpu":
            env["SPARSIFY_DISABLE_TRITON"] = "1"  # sparsify's Triton decoder is CUDA-only; its eager one runs here
        env.pop("PYTHONPATH", None)
        if impl == "visionsae":
            env["PYTHONPATH"] = str(REPO)  # this checkout, not whatever the venv's editable install points at
        self.impl, self.log, self.stderr = impl, log, open(log, "w")
        self.proc = subprocess.Popen(
            [str(python), str(WORKER), impl, "--d", str(shape.d), "--n-latents", str(shape.n_latents),
             "--k", str(shape.k), "--batch", str(shape.batch), "--reps", str(shape.reps),
             "--device", shape.device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        self.info = self._read("@@READY ")

    def _read(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return json.loads(line[len(tag):])
        self.close()
        raise NotMeasured(f"worker exited ({self.proc.returncode}): {_last_line(self.log.read_text())}")

    def time_round(self) -> dict:
        self.proc.stdin.write("time\n")
        self.proc.stdin.flush()
        return self._read("@@RESULT ")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the worker's loop ends at end of input
            self.proc.wait()
        self.stderr.close()


def summarise(rounds: list[dict]) -> dict:
    keys = ("step_cpu_s", "matmul_cpu_s", "step_wall_s", "matmul_wall_s")
    best = {key: min(r[key] for r in rounds) for key in keys}
    return {**best, "step_over_matmul_cpu": best["step_cpu_s"] / best["matmul_cpu_s"],
            "step_over_matmul_wall": best["step_wall_s"] / best["matmul_wall_s"],
            "per_round_step_over_matmul_cpu": [r["step_cpu_s"] / r["matmul_cpu_s"] for r in rounds],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds), "rounds": rounds}


def markdown(result: dict) -> str:
    rows = ["| implementation | version | step CPU s | 1 enc. matmul CPU s | step / matmul (CPU) | "
            "step / matmul per round (CPU) | step wall s | step / matmul (wall) | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for impl, r in result["implementations"].items():
        if "not_measured" in r:
            why = r["not_measured"].replace("|", "\\|")  # a reason must not split the table's row
            rows.append(f"| {LABELS[impl]} | {r.get('version', '')} | not measured: {why} "
                        "| | | | | | |")
            continue
        per_round = ", ".join(f"{x:.2f}" for x in r["per_round_step_over_matmul_cpu"])
        rows.append(f"| {LABELS[impl]} | {r['version']} | {r['step_cpu_s']:.4g} | {r['matmul_cpu_s']:.4g} | "
                    f"**{r['step_over_matmul_cpu']:.2f}** | {per_round} | {r['step_wall_s']:.4g} | "
                    f"{r['step_over_matmul_wall']:.2f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--envs", type=Path, default=REPO / "bench" / ".peer-envs")
    ap.add_argument("--in-place", action="store_true", help="Run the peers with this interpreter (they are "
                    "installed in it already): a machine with no network, e.g. the GPU check")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=1, help="timings of each op per round (best kept)")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--n-latents", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--impls", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: visionsae and sparsify only (bf16 autocast, each trainer's CUDA default); compare "
                         "the wall columns there")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = sorted(set(impls) - set(ORDER))
    if unknown or args.rounds < 1 or args.reps < 1:
        sys.exit(f"--impls takes names from {','.join(ORDER)} (got {','.join(unknown) or 'none unknown'}); "
                 "--rounds and --reps must be at least 1")
    args.envs.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict] = {}
    workers: dict[str, Worker] = {}
    for impl in impls:  # built one after another: warm-ups do not compete with each other
        try:
            python = (Path(sys.executable) if impl == "visionsae" or args.in_place
                      else ensure_env(args.envs, impl, PEERS[impl]))
            workers[impl] = Worker(impl, python, args, args.envs / f"{impl}.worker.log")
            out[impl] = dict(workers[impl].info)
        except (NotMeasured, OSError, subprocess.CalledProcessError) as e:
            out[impl] = {"not_measured": str(e)}
    rounds: dict[str, list[dict]] = {impl: [] for impl in workers}
    loads = [os.getloadavg()[0]]
    t0 = time.time()
    for _ in range(args.rounds):
        for impl in list(workers):
            try:
                rounds[impl].append(workers[impl].time_round())
            except (NotMeasured, OSError) as e:
                out[impl] = {**out[impl], "not_measured": f"in round {len(rounds[impl]) + 1}: {e}"}
                workers.pop(impl).close()
        loads.append(os.getloadavg()[0])
    for worker in workers.values():
        worker.close()
    for impl, rs in rounds.items():
        if rs and "not_measured" not in out[impl]:
            out[impl].update(summarise(rs))
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread per implementation",
              "date": time.strftime("%Y-%m-%d", time.gmtime(t0)), "python": platform.python_version(),
              "shape": {"d": args.d, "n_latents": args.n_latents, "k": args.k, "batch": args.batch},
              "rounds": args.rounds, "reps": args.reps, "load1_min_max": [min(loads), max(loads)],
              "minutes": (time.time() - t0) / 60, "implementations": out}
    print(json.dumps(result, indent=1))
    if args.markdown:
        print()
        print(markdown(result))


if __name__ == "__main__":
    main()
