"""``sae-eval CKPT [CKPT ...]``: flags -> EvalConfig -> runner.run."""

from __future__ import annotations

import click

from visionsae.errors import OneLineCommand, one_line_errors
from visionsae.evaluate.config import DEFAULT_OUT, EvalConfig, parse_int_list

_D = EvalConfig(checkpoints=[])


def _ints(text: tuple[int, ...]) -> str:
    return ",".join(map(str, text))


@click.command("sae-eval", cls=OneLineCommand,
               context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--store", default=None, help="Activation store to read instead of the one each checkpoint records: "
              "the same store moved, or a sibling with the same backbone and layer over other images (e.g. the "
              "test split), all of whose images are then evaluated on.")
@click.option("--k-sweep", default=_ints(_D.k_sweep), help="Inference-time k' values to re-measure "
              "reconstruction at ('' for none).")
@click.option("--ms-embeddings", default=None, type=click.Path(),
              help="Store of another backbone over the same images, whose image-level vectors the Monosemanticity "
              "Score compares images with (default: the evaluated layer's own).")
@click.option("--ms-embeddings-layer", default=None, help="Layer of --ms-embeddings to use (default: its only "
              "layer, or its 'embedding' layer).")
@click.option("--image-pooling", type=click.Choice(["max", "cls"]), default=_D.image_pooling,
              help="Token layers: a latent's per-image activation (MS, purity, top images, probes) is its maximum "
              "over the image's tokens, or its activation on the class token (Pach et al.; stores with --tokens all).")
@click.option("--probe-budgets", default=_ints(_D.probe_budgets), help="Latents kept per image for the linear "
              "probes ('' for no probes).")
@click.option("--max-images", type=int, default=None, help="Use at most N held-out images and N probe-training "
              "images (seeded random subsets). Default: every held-out image.")
@click.option("--probe-train-images", type=int, default=_D.probe_train_images,
              help="Probe-training images drawn from the images outside the held-out split.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default=_D.device)
@click.option("--out", default=DEFAULT_OUT, type=click.Path(file_okay=False),
              help="Report directory (created; report files in it are replaced).")
@click.option("--batch-rows", type=int, default=_D.batch_rows, help="Rows per forward pass.")
@click.option("--top-images", type=int, default=_D.top_images, help="Top images per latent for purity and the page.")
@click.option("--seed", type=int, default=_D.seed)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def main(checkpoints, store, k_sweep, ms_embeddings, ms_embeddings_layer, image_pooling, probe_budgets, max_images,
         probe_train_images, device, out, batch_rows, top_images, seed, quiet):
    """Evaluate SAE checkpoints on their held-out images; write report.json, report.md, plots and index.html.

    Reads the store each checkpoint was trained on (or --store) and evaluates on the checkpoint's held-out
    images; checkpoints of the same store are evaluated in one pass over the data. The report goes to
    ./eval-report unless --out says otherwise.
    """
    from visionsae.evaluate.runner import run
    cfg = EvalConfig(checkpoints=list(checkpoints), store=store, k_sweep=parse_int_list(k_sweep, "--k-sweep"),
                     ms_embeddings=ms_embeddings, ms_embeddings_layer=ms_embeddings_layer, image_pooling=image_pooling,
                     probe_budgets=parse_int_list(probe_budgets, "--probe-budgets"), max_images=max_images,
                     probe_train_images=probe_train_images, device=device, out=out, batch_rows=batch_rows,
                     top_images=top_images, seed=seed, progress=not quiet)
    result = run(cfg)
    click.echo(f"evaluated {len(result.checkpoints)} checkpoint(s); report in {cfg.out}/ "
               f"(report.md, report.json, and the latent explorer: open {cfg.out}/index.html in a browser)")


if __name__ == "__main__":
    main()
