"""``sae-extract``: run a vision backbone over a dataset and write its activations to a store.

The flags are ExtractConfig's fields (visionsae.cli_options), plus --resume / --overwrite for its mode."""

from __future__ import annotations

import click

from visionsae.cli_options import click_options, config_kwargs
from visionsae.errors import OneLineCommand, UserError, one_line_errors
from visionsae.extract.config import ExtractConfig
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
@click_options(ExtractConfig)
@click.option("--resume", is_flag=True, help="Continue an interrupted store: only missing shards are computed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@one_line_errors
def main(resume, overwrite, **kwargs):
    """Run a vision backbone over a dataset and write its activations to a sharded store (cache_layout.md)."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: pass one of them")
    cfg = ExtractConfig(mode="resume" if resume else "overwrite" if overwrite else "new",
                        **config_kwargs(ExtractConfig, kwargs))
    result = extract(cfg)
    if result.n_skipped >= 0:  # rank 0 (or a single process) speaks for the run
        skipped = f", {result.n_skipped} unreadable images skipped (valid = 0)" if result.n_skipped else ""
        click.echo(f"wrote {result.path}: {result.n_images} images in {result.n_shards} shards "
                   f"({result.images_written} extracted now, {result.seconds:.1f} s){skipped}")


if __name__ == "__main__":
    main()
