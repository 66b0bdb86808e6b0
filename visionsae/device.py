"""``--device`` of every stage, read one way: auto | cpu | cuda | cuda:N."""

from __future__ import annotations

import torch

from visionsae.errors import UserError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The torch device ``name`` asks for. ``auto`` is CUDA where torch sees a device, else the CPU; plain
    ``cuda`` is ``cuda:<local_rank>`` when a rank is given (one GPU per process under torchrun), else torch's
    current CUDA device. A CUDA device that is not there, or a name that is not a device, is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is available: use --device cpu")
        if name == "cuda" and local_rank is not None:
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise UserError(f"unknown --device '{name}': use auto, cuda, cuda:N or cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # e.g. cuda:x, cudafoo
        raise UserError(f"unknown --device '{name}': use auto, cuda, cuda:N or cpu") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")
    return device
