"""CUDA extraction: shards leave the GPU asynchronously (side stream, pinned memory) and the store holds exactly
the bytes a blocking copy would have written, for every stored dtype."""

from __future__ import annotations

import pytest
import torch

from conftest import store_files
from visionsae.extract import ExtractConfig, extract
from visionsae.extract import pipeline

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_async_copies_write_the_bytes_of_blocking_ones(tmp_path, image_tree, monkeypatch, dtype):
    def run(out):
        extract(ExtractConfig(model="timm:test_vit", random_init=True, model_kwargs={"img_size": 32},
                              dataset="folder", data_root=str(image_tree), layers="0,embedding", tokens="all",
                              dtype=dtype, images_per_shard=10, workers=0, device="cuda", out=str(out),
                              progress=False))
        return store_files(out)

    async_files = run(tmp_path / "async.zarr")
    # The blocking reference: the writer thread's .cpu() of the device buffers, as before side streams.
    monkeypatch.setattr(pipeline, "copy_to_host", lambda acts, stream: acts)
    assert run(tmp_path / "blocking.zarr") == async_files
