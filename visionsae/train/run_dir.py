"""The run directory: who may write into it, the checkpoints, and the trainer state that --resume reads.

Layout (run_layout.md; the same for one configuration or many; visionsae.runs reads it):
    DIR/config.json, DIR/trainer_state.pt
    DIR/<name>/ckpt.pt, DIR/<name>/log.jsonl (, saelens/, sparsify/)

``trainer_state.pt`` holds everything the loop needs to continue exactly (every model's unfolded
weights, optimiser moments, dead-latent counters, the step, the loader's grouping, RNG state) in ONE
file, so the runs of a multi-configuration pass can never be saved at different steps. Every file is
written atomically (temporary name, fsync, rename) and the .pt files carry a checksum of their contents;
only rank 0 writes, holding the lock ``.<DIR name>.lock`` beside DIR (visionsae.locks) for the whole run.
"""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from visionsae.atomic import atomic_write
from visionsae.errors import CheckpointError, UserError
from visionsae.locks import OutputLock
from visionsae.runs import CHECKPOINT, CONFIG, LOG, STATE, run_dir
from visionsae.sae.checkpoint import atomic_torch_save, verify_checksum, with_checksum

STATE_FILE = STATE
STATE_FORMAT = "visionsae-trainer-state"
STATE_VERSION = 1
OWN_FILES = (CHECKPOINT, LOG, STATE_FILE, CONFIG)
EXPORTS = ("saelens", "sparsify")


def run_dirs(out: Path, names: list[str]) -> dict[str, Path]:
    return {n: run_dir(out, n) for n in names}


def _existing(out: Path, names: list[str]) -> list[Path]:
    # DIR/ckpt.pt, DIR/log.jsonl and DIR/<export>/: a lone configuration's files before run_layout 1
    own = [out / f for f in OWN_FILES] + [out / e for e in EXPORTS]
    return [p for p in own + [run_dir(out, n) for n in names] if p.exists()]


def has_run_files(out: Path, names: list[str]) -> bool:
    return bool(_existing(out, names))


def check_out_dir(out: Path, names: list[str], *, resume: bool, overwrite: bool) -> bool:
    """Refuse to write over an existing run unless asked (read-only: every rank may call it).

    Returns True when the run starts fresh although --resume was given: nothing was saved yet (a run
    killed before its first save), so there is nothing to continue, as sae-extract --resume does."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: choose a directory for the run")
    if resume:
        if (out / STATE_FILE).exists() and (out / CHECKPOINT).exists():
            raise UserError(f"{out} holds a run in the layout of older visionsae versions ({CHECKPOINT} in {out} "
                            f"itself), which --resume cannot continue: train it again with --overwrite")
        return not (out / STATE_FILE).exists()
    existing = _existing(out, names)
    if existing and not overwrite:
        raise UserError(f"{out} already holds a run ({existing[0].name}): pass --resume to continue it, "
                        "--overwrite to replace it, or choose another --out")
    return False


def prepare_out_dir(out: Path, names: list[str], dist) -> "OutputLock | None":
    """Rank 0 locks the run directory (one writer per run) and removes what a killed writer left (its
    temporary files); every rank learns whether that worked, so a refusal never strands a rank."""
    error, lock = None, None
    if dist.main:
        try:
            if out.exists() and not out.is_dir():
                raise UserError(f"--out {out} is a file: choose a directory for the run")
            lock = OutputLock(out, "sae-train").acquire()  # beside the run directory, created later
            for d in [out] + [out / n for n in names]:
                for tmp in d.glob(".*.tmp*") if d.is_dir() else []:
                    tmp.unlink(missing_ok=True)
        except UserError as err:
            error = str(err)
            if lock is not None:
                lock.release()
    if dist.world > 1:
        import torch.distributed as tdist
        box = [error]
        tdist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)
    return lock


def clear_out_dir(out: Path, names: list[str]) -> None:
    """--overwrite: remove this tool's files of the old run, nothing else."""
    for p in _existing(out, names):
        if p.is_dir() and p.name not in EXPORTS:
            for f in OWN_FILES:
                (p / f).unlink(missing_ok=True)
            for e in EXPORTS:
                shutil.rmtree(p / e, ignore_errors=True)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()


def _write_text(path: Path, text: str) -> None:
    try:
        atomic_write(path, text.encode(), hidden=True)
    except OSError as err:
        raise _write_error(path, err) from None


def _write_error(path: Path, err: OSError) -> UserError:
    what = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return UserError(f"cannot write {path} ({what}): free space or fix the location, then rerun with --resume "
                     "(the last saved checkpoint is kept)")


def write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def append_log(path: Path, record: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise _write_error(path, err) from None


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines of steps after ``step`` (logged by a run killed before its next save), and a last line
    cut short by the kill."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if line and json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    _write_text(path, "".join(line + "\n" for line in keep))


def save_state(out: Path, state: dict[str, Any]) -> None:
    atomic_torch_save(with_checksum({"format": STATE_FORMAT, "format_version": STATE_VERSION, **state}),
                      out / STATE_FILE)


def load_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable trainer state ({str(err).splitlines()[0][:160]}): "
                              "start again with --overwrite") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a visionsae trainer state: start again with --overwrite")
    if state.get("format_version") != STATE_VERSION:
        raise CheckpointError(f"{path} has trainer-state version {state.get('format_version')}, this visionsae "
                              f"reads {STATE_VERSION}: start again with --overwrite")
    verify_checksum(state, path, "trainer state")
    return state


# Settings a resumed run must share with the run it continues (the rest, e.g. --save-every, may change).
RESUME_KEYS = ("layer", "arch", "k", "expansion", "n_latents", "reg", "beta", "gamma", "lr", "batch_size",
               "steps", "epochs", "val_fraction", "seed", "warmup_steps", "decay_frac", "grad_clip",
               "auxk_coeff", "dead_rows", "l1_coeff", "softk_alpha", "softk_weight")


def check_resumable(saved_cfg: dict[str, Any], cfg: dict[str, Any], saved_store: dict[str, Any],
                    store: dict[str, Any]) -> None:
    if saved_store.get("fingerprint") != store.get("fingerprint"):
        raise UserError(f"--resume: the run was trained on a different store (fingerprint "
                        f"{str(saved_store.get('fingerprint'))[:16]}...) than {store.get('path')}")
    for key in RESUME_KEYS:
        if saved_cfg.get(key) != cfg.get(key):
            raise UserError(f"--resume: --{key.replace('_', '-')} was {saved_cfg.get(key)} in the saved run, "
                            f"now {cfg.get(key)}: use the same settings to continue it")
