"""``sae-eval CKPT [CKPT ...]``: flags (EvalConfig's fields, visionsae.cli_options) -> EvalConfig -> evaluation.run."""

from __future__ import annotations

import click

from visionsae.cli_options import click_options, config_kwargs
from visionsae.errors import OneLineCommand, one_line_errors
from visionsae.evaluate.config import EvalConfig


@click.command("sae-eval", cls=OneLineCommand,
               context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click_options(EvalConfig)
@one_line_errors
def main(checkpoints, **kwargs):
    """Evaluate SAE checkpoints on their held-out images; write report.json, report.md, plots and index.html.

    CHECKPOINTS are ckpt.pt files or sae-train output directories (every finished run in them, run_layout.md).
    Reads the store each checkpoint was trained on (or --store) and evaluates on the checkpoint's held-out
    images; checkpoints of the same store are evaluated in one pass over the data. The report goes to
    ./eval-report unless --out says otherwise.
    """
    from visionsae.evaluate.evaluation import run
    cfg = EvalConfig(checkpoints=list(checkpoints), **config_kwargs(EvalConfig, kwargs))
    result = run(cfg)
    click.echo(f"evaluated {len(result.checkpoints)} checkpoint(s); report in {cfg.out}/ "
               f"(report.md, report.json, and the latent explorer: open {cfg.out}/index.html in a browser)")


if __name__ == "__main__":
    main()
