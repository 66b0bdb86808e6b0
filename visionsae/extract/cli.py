"""``sae-extract``: run a vision backbone over a dataset and write its activations to a store."""

from __future__ import annotations

import click

from visionsae.errors import OneLineCommand, UserError, one_line_errors
from visionsae.extract.backbones import model_choices
from visionsae.extract.config import DTYPES, FORMATS, ExtractConfig
from visionsae.images import DATASETS
from visionsae.extract.layers import TOKENS
from visionsae.extract.pipeline import extract

_EPILOG = """
\b
Examples:
  sae-extract --limit 200 --out /tmp/x.zarr        (EfficientNet-Lite0, shipped weights, on digits)
  sae-extract --model clip --dataset imagenet --data-root /data/imagenet --split val \\
      --layers 6,-1,embedding --tokens all --dtype bfloat16 --batch-size 256 --out runs/clip.zarr
  torchrun --nproc-per-node 4 -m visionsae.extract.cli ...same flags...   (shards split over ranks)
"""


# Choices are checked by ExtractConfig, not click.Choice, so that a bad value is a one-line error.
@click.command("sae-extract", cls=OneLineCommand, epilog=_EPILOG,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", default="efficientnet-lite0", show_default=True, help=f"One of {model_choices()}.")
@click.option("--dataset", default="digits", show_default=True, help=f"One of {', '.join(DATASETS)}.")
@click.option("--data-root", default=None, help="Dataset location (fashion-mnist defaults to the Debian "
              "package's folder; imagenet and folder need it).")
@click.option("--split", default="train", show_default=True, help="train or val.")
@click.option("--layers", default=None, help="Comma-separated: block indices (negative from the end, e.g. 6,-1), "
              "block_N / stage_N, or embedding. [default: last block of a transformer; embedding of a CNN]")
@click.option("--tokens", default=None, help=f"Rows kept per image at blocks/stages: {', '.join(TOKENS)}. "
              "[default: cls, or mean for models without a class token]")
@click.option("--dtype", default="float16", show_default=True, help=f"Storage dtype: {', '.join(DTYPES)}.")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--workers", default=None, type=int, help="Image-decoding processes. [default: CPUs - 1, at most 8]")
@click.option("--limit", default=None, type=int, help="Keep N images spread evenly over the split.")
@click.option("--device", default="auto", show_default=True, help="auto, cuda or cpu.")
@click.option("--random-init", is_flag=True, help="Random weights (seeded): no download, for tests.")
@click.option("--weights", default=None, help="Local state dict (.safetensors or torch) instead of downloading.")
@click.option("--format", "fmt", default="zarr", show_default=True, help=f"Store format: {', '.join(FORMATS)}.")
@click.option("--out", default=None, help="Store path. [default: runs/<model>-<dataset>-<split>.zarr]")
@click.option("--resume", is_flag=True, help="Continue an interrupted store: only missing shards are computed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--strict", is_flag=True, help="Fail on an unreadable image instead of skipping it.")
@click.option("--images-per-shard", default=1024, show_default=True, type=int)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def main(model, dataset, data_root, split, layers, tokens, dtype, batch_size, workers, limit, device, random_init,
         weights, fmt, out, resume, overwrite, strict, images_per_shard, quiet):
    """Run a vision backbone over a dataset and write its activations to a sharded store (cache_layout.md)."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: pass one of them")
    cfg = ExtractConfig(model=model, dataset=dataset, data_root=data_root, split=split, layers=layers,
                        tokens=tokens, dtype=dtype, batch_size=batch_size, workers=workers, limit=limit,
                        device=device, random_init=random_init, weights=weights, format=fmt, out=out,
                        mode="resume" if resume else "overwrite" if overwrite else "new", strict=strict,
                        images_per_shard=images_per_shard, progress=not quiet)
    result = extract(cfg)
    if result.n_skipped >= 0:  # rank 0 (or a single process) speaks for the run
        skipped = f", {result.n_skipped} unreadable images skipped (valid = 0)" if result.n_skipped else ""
        click.echo(f"wrote {result.path}: {result.n_images} images in {result.n_shards} shards "
                   f"({result.images_written} extracted now, {result.seconds:.1f} s){skipped}")


if __name__ == "__main__":
    main()
