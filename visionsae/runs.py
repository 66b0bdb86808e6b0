"""Reading a run directory of sae-train (run_layout.md): its runs, whether they finished, their metrics.

    <out>/config.json          the pass: settings, the names of its runs (in order), the layout version
    <out>/trainer_state.pt     what --resume continues from
    <out>/<name>/ckpt.pt       one directory per configuration, however many the pass trained
    <out>/<name>/log.jsonl     ... whose last record is {"event": "final", ...} once the run finished

Scripts and sae-eval read runs through these functions, never by matching files themselves.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from visionsae.errors import UserError

RUN_LAYOUT = 1  # config.json's "run_layout"; absent in directories written before it (see legacy_dir)
CONFIG = "config.json"
STATE = "trainer_state.pt"
CHECKPOINT = "ckpt.pt"
LOG = "log.jsonl"
FINAL_EVENT = "final"
_TAIL_BYTES = 1 << 16  # a final record is a few hundred bytes; reading only the tail keeps this O(1) per run


def run_dir(out: Path | str, name: str) -> Path:
    """Where sae-train writes the files of configuration ``name``."""
    return Path(out) / name


@dataclasses.dataclass(frozen=True)
class Run:
    """One configuration of a pass: its name and directory."""

    name: str
    dir: Path

    @property
    def checkpoint(self) -> Path:
        """The latest checkpoint (periodic while training, final once ``finished``)."""
        return self.dir / CHECKPOINT

    @property
    def log(self) -> Path:
        return self.dir / LOG

    def final(self) -> dict[str, Any] | None:
        """The final log record (step and final metrics: train_*, and val_* where there is a validation split);
        None while the run has not finished."""
        record = last_record(self.log)
        return record if record is not None and record.get("event") == FINAL_EVENT else None

    @property
    def finished(self) -> bool:
        return self.final() is not None and self.checkpoint.is_file()

    def final_metrics(self) -> dict[str, float]:
        """The final metrics, without the record's bookkeeping (event, step); a one-line error if unfinished."""
        record = self.final()
        if record is None:
            raise UserError(f"run {self.dir} has not finished (no final record in {self.log}): wait for it, or "
                            "continue it with sae-train ... --resume")
        return {k: v for k, v in record.items() if k not in ("event", "step")}

    def settings(self) -> dict[str, Any]:
        """The resolved training settings of this configuration (the checkpoint's ``train`` record: name, arch,
        k, reg, beta, gamma, n_latents, lr, ...; run_layout.md)."""
        from visionsae.sae.checkpoint import read_checkpoint
        return dict(read_checkpoint(self.checkpoint)["train"])


def read_config(out: Path | str) -> dict[str, Any]:
    path = Path(out) / CONFIG
    if not path.is_file():
        raise UserError(f"{out} is not a sae-train run directory (no {CONFIG}): pass the --out of sae-train")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}): it is not a sae-train run directory") from None
    if not isinstance(config, dict) or not isinstance(config.get("runs"), list):
        raise UserError(f"{path} lists no runs: it was not written by sae-train")
    return config


def list_runs(out: Path | str) -> list[Run]:
    """Every configuration of the pass in ``out``, in the order sae-train trained them."""
    config = read_config(out)
    names = [str(n) for n in config["runs"]]
    if legacy_dir(out, config):
        return [Run(names[0], Path(out))]
    return [Run(n, run_dir(out, n)) for n in names]


def legacy_dir(out: Path | str, config: dict[str, Any]) -> bool:
    """Directories written before run_layout 1 held a lone configuration's files in ``out`` itself."""
    return ("run_layout" not in config and len(config["runs"]) == 1 and (Path(out) / CHECKPOINT).is_file()
            and not (Path(out) / str(config["runs"][0])).is_dir())


def is_finished(out: Path | str) -> bool:
    """Every configuration of the pass in ``out`` finished (False for a missing or partial directory)."""
    try:
        runs = list_runs(out)
    except UserError:
        return False
    return bool(runs) and all(r.finished for r in runs)


def finished_checkpoints(out: Path | str) -> list[Path]:
    """The final checkpoints of the pass in ``out``, or [] while any of its runs is unfinished (ckpt.pt is also
    written at the periodic saves, so its existence says nothing)."""
    return [r.checkpoint for r in list_runs(out)] if is_finished(out) else []


def last_record(log: Path) -> dict[str, Any] | None:
    """The last complete JSON line of a log.jsonl; None if there is none (missing, empty, cut short)."""
    try:
        with open(log, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                return None  # a last line cut short by a kill: not a finished run
            return record if isinstance(record, dict) else None
    return None


def checkpoints_of(path: Path | str) -> list[Path]:
    """A path given where a checkpoint is expected: a ckpt.pt as it is; a run directory (sae-train's --out, or
    one <name>/ inside it) -> its final checkpoints, with a one-line error if a run has not finished."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    if (path / CONFIG).is_file():
        runs = list_runs(path)
    else:
        runs = [r for r in _runs_or_none(path.parent) if r.dir == path]  # one <name>/ of a pass
        if not runs:
            if (path / CHECKPOINT).is_file():
                return [path / CHECKPOINT]
            raise UserError(f"{path} is neither a checkpoint nor a sae-train run directory (no {CONFIG}, no "
                            f"{CHECKPOINT}): pass a ckpt.pt or the --out of sae-train")
    for r in runs:
        if not r.finished:
            raise UserError(f"run {r.dir} has not finished (no final record in its {LOG}): wait for it or continue "
                            f"it with sae-train ... --resume, or pass {r.checkpoint} to use its last saved checkpoint")
    return [r.checkpoint for r in runs]


def _runs_or_none(out: Path) -> list[Run]:
    try:
        return list_runs(out) if (out / CONFIG).is_file() else []
    except UserError:
        return []
