"""The run directory (run_layout.md): sae-train writes <out>/<name>/ for any number of configurations, and
visionsae.runs reads it: the runs, whether they finished, their final metrics and settings."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from visionsae.errors import UserError
from visionsae.runs import (checkpoints_of, finished_checkpoints, is_finished, last_record, list_runs)
from visionsae.store import write_array_store
from visionsae.train.cli import main as train_main

TINY = ["--k", "2", "--expansion", "2", "--batch-size", "16", "--steps", "4", "--save-every", "2", "--no-progress",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    x = np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32)
    path = tmp_path_factory.mktemp("runs") / "s.zarr"
    write_array_store(path, {"a": x}, images_per_shard=128)
    return path


def _train(store, out, *extra):
    result = CliRunner().invoke(train_main, ["--store", str(store), "--out", str(out), *TINY, *extra])
    assert result.exit_code == 0, result.output
    return [line for line in result.output.splitlines() if line.endswith("ckpt.pt")]


def test_one_configuration_and_several_share_one_layout(tiny_store, tmp_path):
    printed = _train(tiny_store, tmp_path / "one")
    runs = list_runs(tmp_path / "one")
    assert [r.name for r in runs] == ["topk-k2-none"]
    assert printed == [str(tmp_path / "one" / "topk-k2-none" / "ckpt.pt")]
    assert runs[0].finished and is_finished(tmp_path / "one")
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config["run_layout"] == 1 and config["runs"] == ["topk-k2-none"]
    assert not (tmp_path / "one" / "ckpt.pt").exists() and (tmp_path / "one" / "trainer_state.pt").is_file()

    printed = _train(tiny_store, tmp_path / "many", "--reg", "none,off")
    runs = list_runs(tmp_path / "many")
    assert printed == [str(r.checkpoint) for r in runs] == [str(tmp_path / "many" / n / "ckpt.pt")
                                                            for n in ("topk-k2-none", "topk-k2-off-b1e-05")]
    metrics = runs[1].final_metrics()
    final = last_record(runs[1].log)
    assert final["event"] == "final" and final["step"] == 4
    assert metrics == {k: v for k, v in final.items() if k not in ("event", "step")} and "train_fvu" in metrics
    assert runs[1].settings()["reg"] == "off" and runs[1].settings()["k"] == 2
    # sae-eval's argument: a run directory stands for its final checkpoints, a <name>/ for its own
    assert checkpoints_of(tmp_path / "many") == finished_checkpoints(tmp_path / "many") == [r.checkpoint for r in runs]
    assert checkpoints_of(runs[0].dir) == [runs[0].checkpoint]
    assert checkpoints_of(runs[0].checkpoint) == [runs[0].checkpoint]


def test_an_unfinished_run_is_not_finished(tiny_store, tmp_path):
    _train(tiny_store, tmp_path / "r", "--stop-at-step", "2")
    (run,) = list_runs(tmp_path / "r")
    assert run.checkpoint.is_file() and not run.finished and not is_finished(tmp_path / "r")
    assert finished_checkpoints(tmp_path / "r") == []
    with pytest.raises(UserError, match="has not finished.*--resume"):
        checkpoints_of(tmp_path / "r")
    with pytest.raises(UserError, match="has not finished"):
        run.final_metrics()
    _train(tiny_store, tmp_path / "r", "--resume")
    assert is_finished(tmp_path / "r") and run.final_metrics()


def test_a_cut_last_line_and_other_directories(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"event": "final", "step": 3}) + "\n" + '{"step": 4, "lo')
    assert last_record(log) is None  # a line cut short by a kill: not finished
    assert last_record(tmp_path / "missing.jsonl") is None
    assert not is_finished(tmp_path / "nothing")
    with pytest.raises(UserError, match="neither a checkpoint nor a sae-train run directory"):
        checkpoints_of(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="lists no runs"):
        list_runs(tmp_path)


def test_a_lone_configuration_written_before_run_layout_1_still_reads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"runs": ["topk-k16-none"]}))  # no run_layout key
    (tmp_path / "ckpt.pt").write_bytes(b"")
    (tmp_path / "log.jsonl").write_text(json.dumps({"event": "final", "step": 9, "val_fvu": 0.5}) + "\n")
    (run,) = list_runs(tmp_path)
    assert run.dir == tmp_path and run.finished and run.final_metrics() == {"val_fvu": 0.5}
    assert finished_checkpoints(tmp_path) == [tmp_path / "ckpt.pt"]


def test_the_progress_bar_names_the_sweep():
    from visionsae.train.config import TrainConfig, describe_runs, expand_runs
    specs = expand_runs(TrainConfig(store="s", arch=("topk",), k=(16,), reg=("none", "off", "ratio", "both")))
    assert describe_runs(specs) == "sae-train 4 runs: topk k16 none|off|ratio|both"
    specs = expand_runs(TrainConfig(store="s", arch=("softk", "batchtopk"), k=(8, 16)))
    assert describe_runs(specs) == "sae-train 4 runs: softk|batchtopk k8|k16 none"
    assert describe_runs(specs[:1]) == "sae-train 1 run: softk k8 none"
