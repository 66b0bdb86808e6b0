"""experiments/fmnist.py: the coefficient choice on the validation split, and which sweeps count as finished."""

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("fmnist_experiment",
                                              Path(__file__).parents[1] / "experiments" / "fmnist.py")
fmnist = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fmnist)


def _ck(reg, fvu, ms, beta=None, gamma=None):
    return {"train": {"reg": reg, "beta": beta, "gamma": gamma}, "reconstruction": {"fvu": fvu},
            "monosemanticity": {"mean": ms}, "sparsity": {"dead_fraction": 0.1}}


def test_choose_takes_the_best_ms_within_the_fvu_limit():
    cks = [_ck("none", 0.300, 0.60),
           _ck("off", 0.301, 0.65, beta=1e-5), _ck("off", 0.314, 0.70, beta=1e-4),  # 1e-4 within 5%: chosen
           _ck("ratio", 0.310, 0.66, gamma=1e-3), _ck("ratio", 0.400, 0.90, gamma=1e-2)]  # 1e-2 costs too much
    chosen = fmnist.choose(cks)
    assert (chosen["beta"], chosen["gamma"]) == (1e-4, 1e-3)
    assert [c["chosen"] for c in chosen["candidates"]] == [False, True, True, False]


def test_choose_falls_back_to_the_lowest_fvu():
    cks = [_ck("none", 0.3, 0.6), _ck("off", 0.5, 0.9, beta=1e-4), _ck("off", 0.4, 0.7, beta=1e-3),
           _ck("ratio", 0.29, 0.61, gamma=1e-3)]
    chosen = fmnist.choose(cks)
    assert (chosen["beta"], chosen["gamma"]) == (1e-3, 1e-3)


def test_a_sweep_counts_as_finished_only_with_every_final_record(tmp_path):
    # the reader itself is tested in test_runs.py; here: the script asks it, not the files
    (tmp_path / "config.json").write_text(json.dumps({"run_layout": 1, "runs": ["a", "b"]}))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ckpt.pt").write_bytes(b"")
        (tmp_path / name / "log.jsonl").write_text(json.dumps({"step": 50}) + "\n")
    assert fmnist.finished_checkpoints(tmp_path) == []  # periodic checkpoints only: resume, do not evaluate
    for name in ("a", "b"):
        with open(tmp_path / name / "log.jsonl", "a") as f:
            f.write(json.dumps({"event": "final", "step": 300}) + "\n")
    assert fmnist.finished_checkpoints(tmp_path) == [tmp_path / "a" / "ckpt.pt", tmp_path / "b" / "ckpt.pt"]
    assert fmnist.checkpoint(tmp_path, "b") == tmp_path / "b" / "ckpt.pt"
    assert fmnist.finished_checkpoints(tmp_path / "missing") == []


def test_refuses_without_the_dataset(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(fmnist, "DATA", tmp_path / "nothing")
    monkeypatch.setattr("sys.argv", ["fmnist.py", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exc:
        fmnist.main()
    assert "apt-get install dataset-fashion-mnist" in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_stage_times_only_for_stages_that_ran_a_command(tmp_path):
    times = fmnist.Times(tmp_path / "times.json")
    with times.stage("skipped"):
        pass
    with times.stage("worked"):
        fmnist.run(["true"], tmp_path / "log")
    recorded = json.loads((tmp_path / "times.json").read_text())
    assert list(recorded) == ["worked"] and recorded["worked"] >= 0
    with fmnist.Times(tmp_path / "times.json").stage("worked"):  # a rerun that skips keeps the figure
        pass
    assert json.loads((tmp_path / "times.json").read_text()) == recorded


def test_length_steps_are_checked_in_one_line(monkeypatch):
    monkeypatch.setattr(fmnist, "LENGTH_STEPS", {"embedding": (1000, 1500), "stage_5": ()})
    assert fmnist.parse_length_steps(None, ["embedding"]) is None
    assert fmnist.parse_length_steps("1500,1000", ["embedding", "stage_5"]) == {1000, 1500}
    for text, layers, message in (("abc", ["embedding"], "comma list of step counts, got 'abc'"),
                                  ("3000", ["embedding"], "3000 is not in LENGTH_STEPS"),
                                  ("1000", ["stage_5"], "for stage_5 (none): add it there first")):
        with pytest.raises(SystemExit) as exc:
            fmnist.parse_length_steps(text, layers)
        assert message in str(exc.value) and "\n" not in str(exc.value)


def test_length_trains_the_second_seed_in_its_own_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(fmnist, "LENGTH_STEPS", {"embedding": (1000, 3000)})
    monkeypatch.setattr(fmnist, "LENGTH_SECOND_SEED", {"embedding": (3000,)})
    calls = []
    monkeypatch.setattr(fmnist, "train", lambda out_dir, *a, seed, steps, **kw: calls.append((out_dir.name, steps,
                                                                                                seed)))
    monkeypatch.setattr(fmnist, "finished_checkpoints", lambda run_dir: [])  # nothing finished: no table yet
    fmnist.length(tmp_path, "embedding", {"beta": 1e-5, "gamma": 1e-3}, only_steps={3000})
    assert calls == [("steps3000", 3000, 0), ("steps3000-s1", 3000, 1)]
    assert not (tmp_path / "length" / "embedding" / "dead_vs_steps.json").exists()


def test_length_table_has_a_column_per_length_and_seed(tmp_path):
    spec = importlib.util.spec_from_file_location("fmnist_summary",
                                                  Path(__file__).parents[1] / "experiments" / "fmnist_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    rows = [{"steps": s, "seed": seed, "reg": reg, "val_dead_frac": 0.1 * s / 1000 + seed / 100, "val_fvu": 0.2}
            for s, seed in ((300, 0), (3000, 0), (3000, 1)) for reg in ("none", "off", "ratio", "both")]
    rows = [{k: v for k, v in r.items() if k != "seed"} if r["steps"] == 300 else r for r in rows]  # older table
    (tmp_path / "length" / "embedding").mkdir(parents=True)
    (tmp_path / "length" / "embedding" / "dead_vs_steps.json").write_text(json.dumps(rows))
    lines = summary.length_section(tmp_path, "embedding")
    assert lines[2] == "| regularizer | 300 steps | 3000 steps | 3000 steps, seed 1 |"
    assert lines[4] == "| none | 3.0% (0.200) | 30.0% (0.200) | 31.0% (0.200) |"
    # with the length stage's evaluation on the test images: a second table, same columns, read from its report
    checkpoints = []
    for i, r in enumerate(rows):
        r["checkpoint"] = str(tmp_path / f"run{i}" / "ckpt.pt")
        checkpoints.append({"path": r["checkpoint"], "reconstruction": {"fvu": 0.2},
                            "sparsity": {"l0": 16.0, "dead_fraction": 0.05 + i / 1000, "l1_l2_ratio": 2.0},
                            "monosemanticity": {"mean": 0.7, "n_latents": 100},
                            "purity": {"top": {"mean": 0.75, "n_latents": 100}}, "k_sweep": {}, "probes": {}})
    (tmp_path / "length" / "embedding" / "dead_vs_steps.json").write_text(json.dumps(rows))
    assert len(summary.length_section(tmp_path, "embedding")) == 9  # no report yet: one table
    (tmp_path / "test" / "embedding-length-lite2").mkdir(parents=True)
    (tmp_path / "test" / "embedding-length-lite2" / "report.json").write_text(
        json.dumps({"checkpoints": checkpoints[::-1]}))  # matched by path, not by order
    lines = summary.length_section(tmp_path, "embedding")
    assert lines[11] == "| regularizer | 300 steps | 3000 steps | 3000 steps, seed 1 |"
    assert lines[13] == "| none | 0.700 / 0.750 / 5.0% | 0.700 / 0.750 / 5.4% | 0.700 / 0.750 / 5.8% |"
