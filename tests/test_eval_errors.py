"""Bad input to sae-eval: each case is one line on stderr, exit status 2, and no code from a pickle runs."""

import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from visionsae.errors import CheckpointError, StoreError, UserError
from visionsae.evaluate import EvalConfig, evaluate
from visionsae.evaluate.cli import main
from visionsae.sae import SAEConfig, build_sae, save_checkpoint
from visionsae.store import write_array_store

D = 6


def _store(path, d=D, backbone="arrays"):
    rng = np.random.default_rng(0)
    return write_array_store(path, {"emb": rng.normal(size=(40, d)).astype(np.float32)}, rng.integers(0, 2, 40),
                             images_per_shard=16, backbone_id=backbone)


def _ckpt(path, store, val_slots=range(20, 40), store_path=None, layer_fingerprint=True):
    model = build_sae(SAEConfig(arch="topk", d_in=D, n_latents=12, k=2))
    record = {"path": str(store_path or store.path), "fingerprint": store.fingerprint, "layer": "emb", "d": D}
    if layer_fingerprint:
        record["layer_fingerprint"] = store.layer_fingerprint("emb")
    save_checkpoint(path, model, input_scale=1.0, store=record,
                    split={"val_slots": torch.as_tensor(list(val_slots), dtype=torch.long), "val_fraction": 0.5,
                           "seed": 0}, train={}, step=0, metrics={})
    return str(path)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalerr")
    store = _store(tmp / "store")
    return tmp, store, _ckpt(tmp / "ckpt.pt", store)


def _cli_error(args, tmp):
    result = CliRunner().invoke(main, [*args, "--out", str(tmp / "out"), "--quiet"])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _cli_ok(args, tmp):
    result = CliRunner().invoke(main, [*args, "--out", str(tmp / "out"), "--quiet", "--probe-budgets", ""])
    assert result.exit_code == 0, (result.output, result.exception)
    return True


def test_not_a_checkpoint(good, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    assert "not a readable checkpoint" in _cli_error([str(junk)], tmp_path)
    other = tmp_path / "dict.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    assert "not a visionsae SAE checkpoint" in _cli_error([str(other)], tmp_path)
    assert "does not exist" in _cli_error([str(tmp_path / "nothing.pt")], tmp_path)


def test_truncated_checkpoint(good, tmp_path):
    _, _, ck = good
    data = open(ck, "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    assert "not a readable checkpoint" in _cli_error([str(cut)], tmp_path)


class _Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"format": "visionsae-sae", "x": _Evil(str(marker))}))
    zipped = tmp_path / "evil.pt"
    torch.save({"format": "visionsae-sae", "format_version": 1, "x": _Evil(str(marker))}, zipped)
    assert not marker.exists()
    # a bare pickle is refused before unpickling; the torch zip reaches torch.load(weights_only=True)
    for path, why in ((raw, "not a readable checkpoint"), (zipped, "was not loaded")):
        assert why in _cli_error([str(path)], tmp_path)
        assert not marker.exists(), "loading the checkpoint ran code from the pickle"


def test_store_of_another_backbone_or_width(good, tmp_path):
    _, _, ck = good
    other = _store(tmp_path / "other", backbone="another-backbone")
    assert "records no backbone fingerprint" in _cli_error([ck, "--store", str(other.path)], tmp_path)
    narrow = _store(tmp_path / "narrow", d=D - 2)
    assert "width" in _cli_error([ck, "--store", str(narrow.path)], tmp_path)
    with pytest.raises(StoreError):
        evaluate(EvalConfig([ck], store=str(other.path), progress=False))


def test_sibling_needs_the_same_layer_fingerprint(tmp_path):
    rng = np.random.default_rng(1)

    def store(name, fingerprint):
        return write_array_store(tmp_path / name, {"emb": rng.normal(size=(40, D)).astype(np.float32)},
                                 rng.integers(0, 2, 40), images_per_shard=16, split=name,
                                 backbone_fingerprint=fingerprint)
    train, other_weights = store("train", "sha256:a"), store("test", "sha256:b")
    ck = _ckpt(tmp_path / "c.pt", train)
    assert "another backbone" in _cli_error([ck, "--store", str(other_weights.path)], tmp_path)
    # a checkpoint written before layer fingerprints existed is only matched by its own store
    sibling = store("sibling", "sha256:a")
    old_ck = _ckpt(tmp_path / "old.pt", train, layer_fingerprint=False)
    assert "predates layer fingerprints" in _cli_error([old_ck, "--store", str(sibling.path)], tmp_path)
    assert _cli_ok([ck, "--store", str(sibling.path)], tmp_path)


def test_missing_store(good, tmp_path):
    _, store, _ = good
    ck = _ckpt(tmp_path / "moved.pt", store, store_path=tmp_path / "gone")
    assert "does not exist here" in _cli_error([ck], tmp_path)
    # --store pointing at something that is not a store
    (tmp_path / "notastore").mkdir()
    _, _, good_ck = good
    assert "not a visionsae activation store" in _cli_error([good_ck, "--store", str(tmp_path / "notastore")],
                                                            tmp_path)


def test_empty_held_out_split(good, tmp_path):
    _, store, _ = good
    ck = _ckpt(tmp_path / "noval.pt", store, val_slots=[])
    assert "empty held-out split" in _cli_error([ck], tmp_path)
    with pytest.raises(UserError):
        evaluate(EvalConfig([ck], progress=False))


def test_held_out_slots_outside_the_store(good, tmp_path):
    _, store, _ = good
    ck = _ckpt(tmp_path / "far.pt", store, val_slots=[5, 400])
    with pytest.raises(CheckpointError, match="outside"):
        evaluate(EvalConfig([ck], progress=False))


def test_bad_flags(good, tmp_path):
    _, _, ck = good
    assert "comma-separated integers" in _cli_error([ck, "--k-sweep", "4,x"], tmp_path)
    assert "positive" in _cli_error([ck, "--probe-budgets", "0,2"], tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
def test_cuda_asked_without_a_gpu(good, tmp_path):
    _, _, ck = good
    assert "no CUDA device" in _cli_error([ck, "--device", "cuda"], tmp_path)
