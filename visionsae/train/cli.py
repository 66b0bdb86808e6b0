"""sae-train: the flags are TrainConfig's fields (visionsae.cli_options); call visionsae.train.trainer.train."""

from __future__ import annotations

import os

import click

from visionsae.cli_options import click_options, config_kwargs
from visionsae.errors import OneLineCommand, one_line_errors
from visionsae.train.config import TrainConfig


@click.command("sae-train", cls=OneLineCommand,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click_options(TrainConfig)
@one_line_errors
def main(**kwargs) -> None:
    """Train sparse autoencoders on one layer of an activation store (several configurations in one pass)."""
    from visionsae.train.trainer import train

    paths = train(TrainConfig(**config_kwargs(TrainConfig, kwargs)))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        for p in paths:
            print(p)


if __name__ == "__main__":
    main()
