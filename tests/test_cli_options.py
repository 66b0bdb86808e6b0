"""The three CLIs are generated from their config dataclasses: with no flags they build the dataclass's
defaults, every field a user can set has exactly one flag, and list / switch flags parse as documented."""

from __future__ import annotations

import dataclasses

import click
import pytest

from visionsae.cli_options import cli_fields, config_kwargs
from visionsae.evaluate.cli import main as eval_main
from visionsae.evaluate.config import EvalConfig
from visionsae.extract.cli import main as extract_main
from visionsae.extract.config import ExtractConfig
from visionsae.train.cli import main as train_main
from visionsae.train.config import TrainConfig


def _config(cmd: click.Command, cls: type, args: list[str], **fixed):
    params = cmd.make_context(cmd.name, list(args)).params
    for name in (*fixed, "resume", "overwrite") if cls is ExtractConfig else fixed:  # extract: resume -> mode
        params.pop(name, None)
    return cls(**fixed, **config_kwargs(cls, params))


def test_no_flags_give_the_dataclass_defaults():
    assert _config(train_main, TrainConfig, ["--store", "s"]) == TrainConfig(store="s")
    assert _config(extract_main, ExtractConfig, []) == ExtractConfig()
    assert _config(eval_main, EvalConfig, ["a.pt"], checkpoints=["a.pt"]) == EvalConfig(checkpoints=["a.pt"])


@pytest.mark.parametrize("cmd,cls", [(train_main, TrainConfig), (extract_main, ExtractConfig), (eval_main, EvalConfig)])
def test_every_cli_field_has_one_flag(cmd, cls):
    names = [p.name for p in cmd.params if isinstance(p, click.Option) and p.name != "help"]
    assert sorted(f.name for f, _ in cli_fields(cls)) == sorted(n for n in names if n in {f.name for f in
                                                                                         dataclasses.fields(cls)})
    assert len(names) == len(set(names))


def test_lists_and_switches_parse():
    cfg = _config(train_main, TrainConfig, ["--store", "s", "--k", "8,16", "--beta", "1e-6,1e-5", "--no-progress",
                                            "--resume"])
    assert cfg.k == (8, 16) and cfg.beta == (1e-6, 1e-5) and cfg.progress is False and cfg.resume is True
    cfg = _config(eval_main, EvalConfig, ["a.pt", "--k-sweep", "8,4,8", "--probe-budgets", "", "--quiet"],
                  checkpoints=["a.pt"])
    assert cfg.k_sweep == (4, 8) and cfg.probe_budgets == () and cfg.progress is False
    cfg = _config(extract_main, ExtractConfig, ["--layers", "6,-1", "--format", "hdf5", "--quiet"])
    assert cfg.layers == ("6", "-1") and cfg.format == "hdf5" and cfg.progress is False
    with pytest.raises(click.BadParameter, match="empty item"):
        _config(train_main, TrainConfig, ["--store", "s", "--k", "8,,16"])


@pytest.mark.parametrize("cmd,cls,args,fixed", [(train_main, TrainConfig, ["--store", "s"], {}),
                                                (extract_main, ExtractConfig, [], {}),
                                                (eval_main, EvalConfig, ["a.pt"], {"checkpoints": ["a.pt"]})])
def test_every_command_takes_quiet(cmd, cls, args, fixed):
    assert _config(cmd, cls, [*args, "--quiet"], **fixed).progress is False
