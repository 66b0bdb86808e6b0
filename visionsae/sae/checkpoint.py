"""The checkpoint contract between ``sae-train`` and ``sae-eval``.

``ckpt.pt`` is a dict of tensors and plain Python types only, so that it loads with
``torch.load(path, weights_only=True)`` and loading never runs code:

    {"format": "visionsae-sae", "format_version": 1,
     "config": SAEConfig.to_dict(),            # rebuilds the modules
     "state_dict": {name: tensor},             # weights that map RAW store activations
     "input_scale": float,                     # the scale used in training, already folded in
     "store": {"path": str, "fingerprint": str, "layer_fingerprint": str | None, "layer": str, "d": int,
               "backbone": str},                # the backbone's id (absent in older checkpoints)
     "split": {"val_slots": LongTensor, "val_fraction": float, "seed": int},
     "train": {...the training config...},
     "step": int, "metrics": {name: float},
     "checksum": "crc32:..."}                  # over everything above (content_checksum); verified on load
"""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from visionsae.errors import CheckpointError
from visionsae.sae.base import SAEConfig, SparseAutoencoder
from visionsae.sae.registry import build_sae

FORMAT = "visionsae-sae"
FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` via a temporary file and a rename: a crash leaves the old file.

    A full disk (torch's writer raises RuntimeError, not OSError) is a one-line CheckpointError and
    leaves the previous file as it was."""
    from visionsae.atomic import atomic_write
    path = Path(path)
    try:
        atomic_write(path, lambda f: torch.save(obj, f), hidden=True)
    except (OSError, RuntimeError) as err:
        full = getattr(err, "errno", None) == errno.ENOSPC or any(m in str(err) for m in ("No space left", "write failed"))
        what = "the disk is full" if full else (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(f"cannot write {path} ({what}): free space or fix the location, then rerun with "
                              "--resume (the last saved checkpoint is kept)") from None


def content_checksum(obj: Any) -> str:
    """crc32 over every value of a checkpoint in a fixed order (keys, types, tensors' dtype, shape and bytes).

    torch's zip reader does not check its CRCs, so without this a flipped byte in a tensor loads silently."""
    crc = 0

    def feed(data: bytes) -> None:
        nonlocal crc
        crc = zlib.crc32(data, crc)

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            feed(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                feed(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(value, dict):
            feed(f"D{len(value)}".encode())
            for k in sorted(value, key=repr):
                feed(repr(k).encode())
                walk(value[k])
        elif isinstance(value, (list, tuple)):
            feed(f"L{len(value)}".encode())
            for v in value:
                walk(v)
        else:
            feed(f"V{type(value).__name__}:{value!r}".encode())

    walk(obj)
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


def with_checksum(obj: dict[str, Any]) -> dict[str, Any]:
    return {**obj, "checksum": content_checksum(obj)}


def verify_checksum(obj: dict[str, Any], path: Path, what: str = "checkpoint") -> None:
    """Files written before checksums were recorded have none and are accepted."""
    want = obj.get("checksum")
    if want is None:
        return
    got = content_checksum({k: v for k, v in obj.items() if k != "checksum"})
    if got != want:
        raise CheckpointError(f"{path} fails its checksum ({got} vs the recorded {want}): the {what} file is "
                              "corrupt; use another copy or retrain")


def save_checkpoint(path: str | os.PathLike, model: SparseAutoencoder, *, input_scale: float,
                    store: dict[str, Any], split: dict[str, Any], train: dict[str, Any],
                    step: int, metrics: dict[str, float]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(with_checksum({
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(), "state_dict": state, "input_scale": float(input_scale),
        "store": dict(store), "split": dict(split), "train": dict(train),
        "step": int(step), "metrics": {k: float(v) for k, v in metrics.items()},
    }), path)


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
    verify_checksum(ckpt, path)
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
    bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights (NaN or inf in {', '.join(bad[:3])}): it was saved "
                              "from a diverged run; retrain it with a lower --lr")
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.to(device).eval(), meta
