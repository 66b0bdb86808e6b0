"""What lands in the store is what the backbone computes, image by image, token by token.

Each reference is computed outside visionsae.extract, through the libraries' own APIs
(timm's forward_intermediates, open_clip's encode_image, plain forward hooks).
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config

from visionsae.errors import UserError
from visionsae.extract import ExtractConfig, extract
from visionsae.images import open_dataset
from visionsae.store import open_store


def _images(root, index):
    source = open_dataset("folder", str(root))
    return [source.load(int(i)) for i in index]


def _timm_reference(name, img_size, images):
    torch.manual_seed(0)  # load_backbone seeds random-init builds the same way
    model = timm.create_model(name, pretrained=False, img_size=img_size).eval()
    transform = create_transform(**resolve_data_config({"img_size": img_size}, model=model))
    return model, torch.stack([transform(im) for im in images])


def test_vit_blocks_tokens_and_embedding_match_timm(tmp_path, image_tree):
    out = tmp_path / "vit.zarr"
    extract(ExtractConfig(model="timm:test_vit", random_init=True, model_kwargs={"img_size": 32},
                          dataset="folder", data_root=str(image_tree), layers="1,-1,embedding", tokens="all",
                          dtype="float32", batch_size=5, images_per_shard=8, workers=0, out=str(out),
                          progress=False))
    store = open_store(out)
    store.verify()
    assert store.layer_names == ["block_1", "block_5", "embedding"]
    model, x = _timm_reference("test_vit", 32, _images(image_tree, store.image_index))
    with torch.no_grad():
        inter = model.forward_intermediates(x, indices=[1, 5], norm=False, output_fmt="NLC",
                                            return_prefix_tokens=True, intermediates_only=True)
        emb = model.forward_head(model.forward_features(x), pre_logits=True)
    for name, (patches, prefix) in zip(["block_1", "block_5"], inter):
        info = store.layer(name)
        assert (info.tokens_per_image, info.token_kind, info.kind) == (1 + 4, "all", "residual")
        want = torch.cat([prefix, patches], 1).reshape(-1, info.d).numpy()
        np.testing.assert_allclose(store.read_rows(name, 0, store.n_images * 5), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(store.read_rows("embedding", 0, store.n_images), emb.numpy(), rtol=1e-5, atol=1e-5)
    # every row traces to its file and its class folder
    source = open_dataset("folder", str(image_tree))
    np.testing.assert_array_equal(store.labels, source.labels[store.image_index])
    assert store.classes == ["circle", "square", "stripes"] and store.valid.all()


def test_register_tokens_are_excluded_and_mean_is_their_mean(tmp_path, image_tree):
    """test_vit2 has one register token and no class token: patches skip it, cls is refused."""
    runs = {}
    for tokens in ("patches", "mean"):
        out = tmp_path / f"{tokens}.zarr"
        extract(ExtractConfig(model="timm:test_vit2", random_init=True, model_kwargs={"img_size": 32},
                              dataset="folder", data_root=str(image_tree), layers="-1", tokens=tokens,
                              dtype="float32", limit=10, workers=0, out=str(out), progress=False))
        runs[tokens] = open_store(out)
    patches, mean = runs["patches"], runs["mean"]
    assert patches.layer().tokens_per_image == 4 and mean.layer().tokens_per_image == 1
    model, x = _timm_reference("test_vit2", 32, _images(image_tree, patches.image_index))
    assert model.num_prefix_tokens == 1 and not model.has_class_token
    with torch.no_grad():
        (last,) = model.forward_intermediates(x, indices=[7], norm=False, output_fmt="NLC",
                                              intermediates_only=True)
    np.testing.assert_allclose(patches.read_rows("block_7", 0, 40), last.reshape(-1, last.shape[-1]).numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean.read_rows("block_7", 0, 10), last.mean(1).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="no class token"):
        extract(ExtractConfig(model="timm:test_vit2", random_init=True, dataset="folder",
                              data_root=str(image_tree), tokens="cls", out=str(tmp_path / "cls.zarr")))


def test_cnn_stages_give_spatial_tokens(tmp_path, image_tree):
    out = tmp_path / "cnn.zarr"
    extract(ExtractConfig(model="timm:test_efficientnet", random_init=True, dataset="folder",
                          data_root=str(image_tree), layers="stage_2,-1", tokens="patches", dtype="float32",
                          limit=6, workers=0, out=str(out), progress=False))
    store = open_store(out)
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    x = torch.stack([transform(im) for im in _images(image_tree, store.image_index)])
    seen = {}
    for i in (2, 4):
        model.blocks[i].register_forward_hook(lambda m, a, y, i=i: seen.__setitem__(i, y))
    with torch.no_grad():
        model.forward_features(x)
    for name, i in (("stage_2", 2), ("stage_4", 4)):
        y_BCHW = seen[i]
        info = store.layer(name)
        assert (info.kind, info.token_kind, info.source) == ("stage", "spatial", f"blocks.{i}")
        assert info.tokens_per_image == y_BCHW.shape[2] * y_BCHW.shape[3] and info.d == y_BCHW.shape[1]
        want = y_BCHW.permute(0, 2, 3, 1).reshape(-1, info.d).numpy()  # positions row-major
        np.testing.assert_allclose(store.read_rows(name, 0, 6 * info.tokens_per_image), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="no class token"):
        extract(ExtractConfig(model="timm:test_efficientnet", random_init=True, dataset="folder",
                              data_root=str(image_tree), layers="stage_1", tokens="cls", out=str(tmp_path / "c")))


def test_open_clip_blocks_and_embedding(tmp_path, image_tree, tiny_clip_arch):
    import open_clip

    out = tmp_path / "clip.zarr"
    extract(ExtractConfig(model=f"open_clip:{tiny_clip_arch}", random_init=True, dataset="folder",
                          data_root=str(image_tree), layers="0,embedding", tokens="mean", dtype="float32",
                          limit=9, batch_size=4, workers=0, out=str(out), progress=False))
    store = open_store(out)
    assert store.backbone["id"] == f"open_clip:{tiny_clip_arch}"
    assert store.layer("block_0").source == "visual.transformer.resblocks.0"
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip_arch, pretrained=None)
    model.eval()
    x = torch.stack([preprocess(im) for im in _images(image_tree, store.image_index)])
    with torch.no_grad():
        inter = model.visual.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
        emb = model.encode_image(x)
    block0 = inter["image_intermediates"][0]  # patch tokens (the class token split off)
    np.testing.assert_allclose(store.read_rows("block_0", 0, 9), block0.mean(1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(store.read_rows("embedding", 0, 9), emb.numpy(), rtol=1e-5, atol=1e-5)


def test_float16_and_bfloat16_are_rounded_float32(tmp_path, image_tree):
    stores = {}
    for dtype in ("float32", "float16", "bfloat16"):
        out = tmp_path / f"{dtype}.zarr"
        extract(ExtractConfig(model="timm:test_vit", random_init=True, model_kwargs={"img_size": 32},
                              dataset="folder", data_root=str(image_tree), dtype=dtype, limit=8, workers=0,
                              out=str(out), progress=False))
        stores[dtype] = open_store(out).read_rows("block_5", 0, 8)
    ref = torch.from_numpy(stores["float32"])
    np.testing.assert_array_equal(stores["float16"], ref.half().float().numpy())
    np.testing.assert_array_equal(stores["bfloat16"], ref.bfloat16().float().numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_with_autocast_matches_cpu(tmp_path, image_tree):
    """bf16 autocast on the GPU: the same activations as the float32 CPU run, to bf16 precision."""
    stores = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.zarr"
        extract(ExtractConfig(model="timm:test_vit", random_init=True, model_kwargs={"img_size": 32},
                              dataset="folder", data_root=str(image_tree), layers="-1,embedding", tokens="all",
                              dtype="float32", workers=2, device=device, out=str(out), progress=False))
        stores[device] = open_store(out)
    assert stores["cuda"].attrs["extract"]["autocast"] in ("bfloat16", "float16")
    for layer in ("block_5", "embedding"):
        n = stores["cpu"].layer(layer).tokens_per_image * stores["cpu"].n_images
        a, b = stores["cpu"].read_rows(layer, 0, n), stores["cuda"].read_rows(layer, 0, n)
        assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


def test_forward_hooks_leave_the_backbone_when_extraction_ends(tmp_path, image_tree, monkeypatch):
    """Capture's hooks are removed after extract(), whether it finished or failed (a backbone reused by the
    caller must not keep computing and storing rows)."""
    import visionsae.extract.pipeline as pipeline
    loaded = []

    def load_and_keep(*args, **kwargs):
        bb = real_load(*args, **kwargs)
        loaded.append(bb)
        return bb

    real_load = pipeline.load_backbone
    monkeypatch.setattr(pipeline, "load_backbone", load_and_keep)
    cfg = dict(model="timm:test_vit", random_init=True, model_kwargs={"img_size": 32}, dataset="folder",
               data_root=str(image_tree), layers="0,1", tokens="cls", dtype="float32", batch_size=8,
               images_per_shard=8, workers=0, progress=False)
    extract(ExtractConfig(**cfg, out=str(tmp_path / "ok.zarr")))
    (tmp_path / "taken").write_text("not a store")  # the writer refuses this path after the hooks are in
    with pytest.raises(Exception, match="already exists"):
        extract(ExtractConfig(**cfg, out=str(tmp_path / "taken")))
    assert len(loaded) == 2
    assert [_hook_count(bb.module) for bb in loaded] == [0, 0]
