"""A store read by tools that are not visionsae: xarray (dimension names, consolidated metadata) and the
one line of numpy that views a bfloat16 store's uint16 arrays as float32 (cache_layout.md section 2)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from conftest import make_image_tree
from visionsae.extract import ExtractConfig, extract
from visionsae.store import open_store, write_array_store
from visionsae.store.consolidate import DIMENSION_NAMES

xr = pytest.importorskip("xarray", reason="xarray is a test extra: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A store written by sae-extract's code path: 15 images, shards of 4 (the last one short), two layers."""
    tree = make_image_tree(tmp_path_factory.mktemp("tree"), per_class=5, seed=3)
    out = tmp_path_factory.mktemp("x") / "s.zarr"
    extract(ExtractConfig(model="timm:test_vit", random_init=True, dataset="folder", data_root=str(tree),
                          layers="1,-1", tokens="all", dtype="bfloat16", images_per_shard=4, batch_size=4,
                          workers=0, out=str(out), progress=False))
    return out


def _open_strict(fn, *args, **kwargs):
    """xarray falls back (with a RuntimeWarning) when consolidated metadata is missing: make that a failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        return fn(*args, **kwargs)


def test_xarray_opens_every_group_of_an_extracted_store(extracted):
    store = open_store(extracted)
    for name in store.layer_names:
        info = store.layer(name)
        ds = _open_strict(xr.open_zarr, extracted, group=f"layers/{name}")
        assert ds["acts"].dims == DIMENSION_NAMES["acts"] == ("row", "feature")
        assert ds["mean"].dims == ("feature",)
        assert ds.sizes == {"row": store.n_images * info.tokens_per_image, "feature": info.d}
        assert ds["acts"].dtype == np.uint16  # bfloat16 as stored (see the view below)
    images = _open_strict(xr.open_zarr, extracted, group="images")
    assert {v: images[v].dims for v in images.data_vars} == {v: ("slot",) for v in ("index", "label", "valid")}
    np.testing.assert_array_equal(images["label"].values, store.labels)

    tree = _open_strict(xr.open_datatree, extracted, engine="zarr")
    assert tree.attrs["visionsae"]["complete"] is True
    for name in store.layer_names:
        np.testing.assert_array_equal(tree[f"layers/{name}"]["mean"].values, store.layer(name).mean)
    # timm's test_vit has a classifier head, written after finalize and consolidated with the rest
    head = store.head()
    assert tree["head"]["weight"].dims == ("class", "feature")
    np.testing.assert_array_equal(tree["head"]["weight"].values, head.weight_CD)


def test_consolidated_metadata_is_zarrs_own_less_the_manifest_records(extracted, tmp_path):
    """Our consolidation equals zarr.consolidate_metadata over the same nodes; the records stay out of it."""
    import zarr
    ours = json.loads((extracted / "zarr.json").read_text())["consolidated_metadata"]
    copy = tmp_path / "copy.zarr"
    shutil.copytree(extracted, copy)
    for record in (copy / "manifest").glob("shard-*"):
        shutil.rmtree(record)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(copy))
    theirs = json.loads((copy / "zarr.json").read_text())["consolidated_metadata"]
    assert ours["metadata"].pop("manifest")["consolidated_metadata"] is None
    theirs["metadata"].pop("manifest")
    assert ours == theirs
    assert not [k for k in ours["metadata"] if k.startswith("manifest")]


def test_a_store_written_from_arrays_opens_in_xarray(tmp_path):
    acts = np.random.default_rng(0).standard_normal((2 * 9, 5)).astype(np.float32)
    write_array_store(tmp_path / "a.zarr", {"emb": acts}, np.arange(9) % 3, tokens_per_image=2, images_per_shard=4)
    ds = _open_strict(xr.open_zarr, tmp_path / "a.zarr", group="layers/emb")
    np.testing.assert_array_equal(ds["acts"].values, acts)


def test_one_line_of_numpy_views_bfloat16_as_torch_does(tmp_path):
    """The documented view of a bfloat16 store's uint16 words equals torch's bfloat16 -> float32."""
    values = torch.randn(64 * 2, 6, generator=torch.Generator().manual_seed(0)) * 10
    values[0, :4] = torch.tensor([0.0, -0.0, float("inf"), 1e-40])  # zero signs, infinity, a subnormal
    write_array_store(tmp_path / "b.zarr", {"emb": values.numpy()}, tokens_per_image=2, images_per_shard=16,
                      dtype="bfloat16")
    a = xr.open_zarr(tmp_path / "b.zarr", group="layers/emb", consolidated=True)["acts"].values
    assert a.dtype == np.uint16
    viewed = (a.astype(np.uint32) << 16).view(np.float32)  # the line cache_layout.md gives
    want = values.to(torch.bfloat16).float().numpy()
    assert viewed.tobytes() == want.tobytes()


def test_an_archive_mode_store_opens_in_xarray_and_still_verifies(tmp_path):
    """Archive mode (zstd chunks written through zarr): the same names and consolidation."""
    from visionsae.store import LayerSpec, StoreSpec, StoreWriter
    n, T, d = 10, 3, 4
    acts = np.random.default_rng(2).standard_normal((n * T, d)).astype(np.float32)
    spec = StoreSpec(backbone={"id": "toy", "weights": "none", "fingerprint": None, "preprocessing": None},
                     dataset={"id": "toy", "root": None, "split": "train", "n_images": n, "classes": []},
                     tokens="all", dtype="float32", layers=(LayerSpec("b", "b", "residual", d, T, "all"),),
                     images_per_shard=4, compressed=True)
    writer = StoreWriter.create(tmp_path / "z.zarr", spec)
    for s in range(writer.n_shards):
        a, b = writer.shard_slots(s)
        writer.write_shard(s, index=np.arange(a, b), label=np.full(b - a, -1), valid=np.ones(b - a, bool),
                           acts={"b": acts[a * T:b * T]})
    writer.finalize()
    writer.close()
    open_store(tmp_path / "z.zarr").verify()
    ds = _open_strict(xr.open_zarr, tmp_path / "z.zarr", group="layers/b")
    assert ds["acts"].dims == ("row", "feature")
    np.testing.assert_array_equal(ds["acts"].values, acts)


def test_both_formats_provide_every_operation_of_the_backend_interface():
    """store.zarr and store.hdf5 are symmetric: each provides what writer.py and reader.py call, by name and arity."""
    import inspect

    from visionsae.store import backend, hdf5, zarr

    def ops(proto):
        return {n: inspect.signature(f) for n, f in vars(proto).items() if inspect.isfunction(f) and n[0] != "_"}

    for module, writer_cls in ((zarr, zarr.ZarrChunkWriter), (hdf5, hdf5.H5ChunkWriter)):
        assert module.FORMAT in ("zarr", "hdf5") and module.open_reader.format == module.FORMAT
        for impl, proto in ((module, backend.Backend), (writer_cls, backend.ChunkWriter),
                            (module.open_reader, backend.ChunkReader)):
            assert len(ops(proto)) >= 4
            for name, sig in ops(proto).items():
                got = inspect.signature(getattr(impl, name))
                want = [p for p in sig.parameters if p != "self"]
                have = [p for p in got.parameters if p != "self"]
                assert have == want, f"{impl.__name__}.{name}{got} differs from {proto.__name__}.{name}{sig}"
