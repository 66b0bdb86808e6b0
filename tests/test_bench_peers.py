"""bench/peers.py keeps working against visionsae's own API (it is not run by `make bench`: the peers need
PyPI). Only the visionsae worker runs here, at a tiny shape; no peer is installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peers(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "peers.py"), "--envs", str(tmp_path / "envs"),
                           "--impls", "visionsae", "--d", "16", "--n-latents", "64", "--batch", "32",
                           "--rounds", "2", *args], capture_output=True, text=True, timeout=300)


def test_visionsae_step_is_timed_against_one_matmul(tmp_path):
    proc = _peers(tmp_path, "--k", "4")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    r = result["implementations"]["visionsae"]
    assert "not_measured" not in r, r
    assert len(r["rounds"]) == 2 and r["threads"] == 1
    n_params = int(r["params_updated"].split("/")[1])
    assert int(r["params_updated"].split("/")[0]) == n_params  # the timed step trains every parameter
    assert r["step_cpu_s"] > 0 and r["matmul_cpu_s"] > 0
    assert r["step_over_matmul_cpu"] == r["step_cpu_s"] / r["matmul_cpu_s"]
    assert r["step_cpu_s"] == min(x["step_cpu_s"] for x in r["rounds"])
    assert not (tmp_path / "envs" / "visionsae").exists()  # visionsae runs in the project's environment


def test_a_failing_implementation_is_reported_not_dropped(tmp_path):
    proc = _peers(tmp_path, "--k", "65", "--markdown")  # k > latents: the model refuses to build
    assert proc.returncode == 0, proc.stderr
    assert "| visionsae |  | not measured: worker exited (1): " in proc.stdout
    assert "k=65" in proc.stdout
