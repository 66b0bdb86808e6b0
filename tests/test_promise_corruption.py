"""Promise: every reader refuses damaged data with one line, before using it.

Each case damages one file of a good store, checkpoint or trainer state (a flipped byte, a deleted
chunk) and runs one reader over it: sae-train, sae-eval, the Python API's row reads, checkpoint
loading, --resume. The table lists them with the words the one-line refusal must contain.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from visionsae.errors import UserError
from visionsae.evaluate import EvalConfig, run
from visionsae.sae import load_checkpoint
from visionsae.store import open_store, write_array_store
from visionsae.train import TrainConfig, train

# (reader, damage, what its one-line refusal says)
CASES = [
    ("sae-eval", "flipped byte in a held-out shard's acts chunk (zarr)", "checksum"),
    ("sae-eval", "flipped byte in a held-out shard's acts rows (hdf5)", "checksum"),
    ("sae-eval", "flipped byte in a held-out shard's label chunk", "checksum"),
    ("sae-eval", "deleted label chunk of a held-out shard", "checksum|missing"),
    ("sae-eval", "deleted index chunk of a held-out shard", "checksum|missing"),
    ("sae-train", "flipped byte in an acts chunk", "checksum"),
    ("Store.read_rows", "flipped byte in an acts chunk", "checksum"),
    ("Store.read_slots", "flipped byte in an acts chunk", "checksum"),
    ("load_checkpoint", "flipped byte in a weight tensor of ckpt.pt", "checksum"),
    ("load_checkpoint", "flipped byte in the pickled metadata of ckpt.pt", "checksum|not a readable"),
    ("sae-train --resume", "flipped byte in an optimiser tensor of trainer_state.pt", "checksum"),
    ("open_store", "n_shards edited in the root attributes (zarr)", "n_shards = 5 but"),
    ("open_store", "dataset n_images edited in the root attributes (hdf5)", "dataset.n_images = 65 but"),
]
N, D, IPS = 64, 8, 16


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    x = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    labels = np.arange(N) % 4
    write_array_store(root / "s.zarr", {"e": x}, labels, images_per_shard=IPS)
    write_array_store(root / "s.h5", {"e": x}, labels, images_per_shard=IPS, format="hdf5")
    for name in ("s.zarr", "s.h5"):
        train(TrainConfig(store=str(root / name), n_latents=16, k=(2,), batch_size=16, steps=6, save_every=3,
                          val_fraction=0.25, out=str(root / f"run-{name}"), progress=False))
    return root


def _copy(good: Path, tmp: Path, name: str) -> tuple[Path, Path]:
    """A private copy of the store and its run; the checkpoint is pointed at the copy with --store."""
    store, run_dir = tmp / name, tmp / f"run-{name}"
    (shutil.copytree if (good / name).is_dir() else shutil.copy)(good / name, store)
    shutil.copytree(good / f"run-{name}", run_dir)
    return store, run_dir


def _held_out_shard(run_dir: Path) -> int:
    slots = torch.load(run_dir / "topk-k2-none" / "ckpt.pt", weights_only=True)["split"]["val_slots"]
    return int(slots[0]) // IPS


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _h5_acts_offset(path: Path, shard: int) -> int:
    import h5py
    with h5py.File(path, "r") as f:
        return f["layers/e/acts"].id.get_offset() + shard * IPS * D * 4 + 5


def _edit_root_attrs(path: Path, edit) -> None:
    """Change the root's visionsae attributes in place, as a hand edit would (other bytes kept)."""
    if path.is_dir():
        meta = json.loads((path / "zarr.json").read_text())
        edit(meta["attributes"]["visionsae"])
        (path / "zarr.json").write_text(json.dumps(meta, indent=2))
        return
    import h5py
    with h5py.File(path, "r+") as f:
        attrs = json.loads(f.attrs["visionsae"])
        edit(attrs)
        f.attrs["visionsae"] = json.dumps(attrs)


def _zip_entry_offset(path: Path, pick) -> int:
    """File offset of the middle of the first zip entry ``pick`` accepts (torch's zip stores entries uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if pick(i))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def _eval(run_dir: Path, store: Path, tmp: Path) -> None:
    run(EvalConfig(checkpoints=[str(run_dir / "topk-k2-none" / "ckpt.pt")], store=str(store), k_sweep=(), probe_budgets=(),
                   out=str(tmp / "report"), progress=False))


def _damage_and_read(case: tuple[str, str, str], good: Path, tmp: Path) -> None:
    reader, damage, _ = case
    name = "s.h5" if "hdf5" in damage else "s.zarr"
    store, run_dir = _copy(good, tmp, name)
    shard = _held_out_shard(run_dir)
    if "acts" in damage and name == "s.h5":
        _flip(store, _h5_acts_offset(store, shard))
    elif "acts" in damage:
        _flip(store / "layers" / "e" / "acts" / "c" / str(shard) / "0", 7)
    elif "label chunk" in damage and "flipped" in damage:
        _flip(store / "images" / "label" / "c" / str(shard), 3)
    elif "deleted" in damage:
        (store / "images" / ("label" if "label" in damage else "index") / "c" / str(shard)).unlink()
    elif "weight tensor" in damage:
        ckpt = run_dir / "topk-k2-none" / "ckpt.pt"
        _flip(ckpt, _zip_entry_offset(ckpt, lambda i: "/data/" in i.filename and i.file_size >= 64))
    elif "pickled metadata" in damage:
        ckpt = run_dir / "topk-k2-none" / "ckpt.pt"
        raw = ckpt.read_bytes()
        _flip(ckpt, raw.index(b"input_scale") + 3)  # a byte of a key: still a valid pickle, different content
    elif "edited" in damage:
        _edit_root_attrs(store, lambda a: a.update(n_shards=a["n_shards"] + 1) if "n_shards" in damage
                         else a["dataset"].update(n_images=a["n_images"] + 1))
    elif "trainer_state" in damage:
        state = run_dir / "trainer_state.pt"
        _flip(state, _zip_entry_offset(state, lambda i: "/data/" in i.filename and i.file_size >= 64))

    if reader == "sae-eval":
        _eval(run_dir, store, tmp)
    elif reader == "sae-train":
        train(TrainConfig(store=str(store), n_latents=16, k=(2,), batch_size=16, steps=4, out=str(tmp / "new"),
                          progress=False))
    elif reader == "Store.read_rows":
        open_store(store).read_rows("e", shard * IPS, shard * IPS + 2)
    elif reader == "open_store":
        open_store(store)
    elif reader == "Store.read_slots":
        open_store(store).read_slots("e", np.array([shard * IPS + 1]))
    elif reader == "load_checkpoint":
        load_checkpoint(run_dir / "topk-k2-none" / "ckpt.pt")
    elif reader == "sae-train --resume":
        train(TrainConfig(store=str(store), n_latents=16, k=(2,), batch_size=16, steps=6, save_every=3,
                          val_fraction=0.25, out=str(run_dir), resume=True, progress=False))


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_damage_is_refused_with_one_line(good, tmp_path, case):
    with pytest.raises(UserError, match=case[2]) as info:
        _damage_and_read(case, good, tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "report" / "report.json").exists()  # nothing was reported from damaged data
