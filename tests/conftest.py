"""Shared fixtures: small generated image trees, a tiny open_clip architecture, a CLI runner."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw


def make_image_tree(root: Path, classes=("circle", "square", "stripes"), per_class: int = 8, seed: int = 0) -> Path:
    """PNG/JPEG images of a few drawn classes, of varied sizes, in <class>/ subfolders (one nested)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        for i in range(per_class):
            w, h = int(rng.integers(36, 72)), int(rng.integers(36, 72))
            img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(img)
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            x0, y0 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
            if c % 3 == 0:
                draw.ellipse([x0, y0, x0 + w // 2, y0 + h // 2], fill=colour)
            elif c % 3 == 1:
                draw.rectangle([x0, y0, x0 + w // 2, y0 + h // 2], fill=colour)
            else:
                for k in range(0, w, 6):
                    draw.line([k, 0, k, h], fill=colour, width=2)
            sub = root / name / ("more" if i % 4 == 3 else "")
            sub.mkdir(parents=True, exist_ok=True)
            img.save(sub / f"img_{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    """24 images in 3 classes; read-only for tests (copy it to damage files)."""
    return make_image_tree(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def tiny_clip_arch(tmp_path_factory) -> str:
    """Register a tiny open_clip ViT (32 px, 2 blocks, width 64) under the name ``TinyViT-test``."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_cfg")
    cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    (folder / "TinyViT-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return "TinyViT-test"


def run_cli(*args: str, env: dict | None = None, module: str = "visionsae.extract.cli",
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a CLI module in a fresh interpreter, offline (no model hub), and capture its output."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def save_eval_checkpoint(path: Path, store, layer: str, model, val_slots) -> str:
    """A checkpoint of ``model`` as sae-train would write it for ``store``'s ``layer``, holding out ``val_slots``."""
    from visionsae.sae import save_checkpoint
    save_checkpoint(path, model, input_scale=1.0,
                    store={"path": str(store.path), "fingerprint": store.fingerprint,
                           "layer_fingerprint": store.layer_fingerprint(layer), "layer": layer,
                           "d": store.layer(layer).d},
                    split={"val_slots": torch.as_tensor(val_slots), "val_fraction": 0.5, "seed": 0},
                    train={"note": "test"}, step=1, metrics={})
    return str(path)


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str):
    """A real small filesystem at ``where`` (needs root and mount: the test skips elsewhere), for full disks."""
    where.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if ok.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({ok.stderr.decode().strip()[:80]})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store (a Zarr directory or one HDF5 file) by relative path."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {f.relative_to(path).as_posix(): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
