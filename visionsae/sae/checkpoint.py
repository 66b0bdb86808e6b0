"""The checkpoint contract between ``sae-train`` and ``sae-eval``.

``ckpt.pt`` is a dict of tensors and plain Python types only, so that it loads with
``torch.load(path, weights_only=True)`` and loading never runs code:

    {"format": "visionsae-sae", "format_version": 1,
     "config": SAEConfig.to_dict(),            # rebuilds the modules
     "state_dict": {name: tensor},             # weights that map RAW store activations
     "input_scale": float,                     # the scale used in training, already folded in
     "store": {"path": str, "fingerprint": str, "layer_fingerprint": str | None, "layer": str, "d": int},
     "split": {"val_slots": LongTensor, "val_fraction": float, "seed": int},
     "train": {...the training config...},
     "step": int, "metrics": {name: float}}
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from visionsae.errors import CheckpointError
from visionsae.sae.base import SAEConfig, SparseAutoencoder
from visionsae.sae.registry import build_sae

FORMAT = "visionsae-sae"
FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` via a temporary file and a rename: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: str | os.PathLike, model: SparseAutoencoder, *, input_scale: float,
                    store: dict[str, Any], split: dict[str, Any], train: dict[str, Any],
                    step: int, metrics: dict[str, float]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save({
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(), "state_dict": state, "input_scale": float(input_scale),
        "store": dict(store), "split": dict(split), "train": dict(train),
        "step": int(step), "metrics": {k: float(v) for k, v in metrics.items()},
    }, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw checkpoint dict, loaded safely; one-line CheckpointError on anything wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: pass the ckpt.pt written by sae-train")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory: pass the ckpt.pt file inside it")
    # sae-train always writes torch's zip format; random bytes or a cut-off file are not zip archives.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, or not a torch zip file): "
                              "pass a ckpt.pt written by sae-train")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, the unsafe way out: do not repeat it.
        raise CheckpointError(f"{path} holds objects other than tensors and plain types and was not loaded "
                              "(loading it could run code): use checkpoints written by sae-train") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a torch file): "
                              f"{str(err).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a visionsae SAE checkpoint (no format '{FORMAT}'): "
                              "pass a ckpt.pt written by sae-train")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {ckpt.get('format_version')}, "
                              f"this visionsae reads version {FORMAT_VERSION}")
    return ckpt


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """(model in eval mode on ``device``, the checkpoint dict without its state_dict)."""
    ckpt = read_checkpoint(path)
    try:
        model = build_sae(SAEConfig.from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} does not match its own config: {str(err).splitlines()[0][:200]}") from None
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.to(device).eval(), meta
