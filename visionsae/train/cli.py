"""sae-train: parse flags into a TrainConfig and call visionsae.train.trainer.train."""

from __future__ import annotations

import os

import click

from visionsae.errors import OneLineCommand, one_line_errors
from visionsae.train.config import DEFAULT_BETA, DEFAULT_GAMMA, TrainConfig


def _list(kind, name):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            parts = [v.strip() for v in str(value).split(",")]
            if "" in parts:
                raise click.BadParameter(f"has an empty item in '{value}': separate values with single commas")
            vals = tuple(kind(v) for v in parts)
        except ValueError:
            raise click.BadParameter(f"takes a comma-separated list of {kind.__name__} values, got '{value}'") from None
        if not vals:
            raise click.BadParameter("needs at least one value")
        return vals
    return parse


@click.command("sae-train", cls=OneLineCommand,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--store", required=True, help="Activation store written by sae-extract (Zarr directory or HDF5 file).")
@click.option("--layer", default=None, help="Layer of the store (needed when it holds several).")
@click.option("--arch", default="topk", callback=_list(str, "arch"), help="topk|softk|batchtopk|relu, or a list.")
@click.option("--k", "k", default="32", callback=_list(int, "k"), help="Latents kept per input (list allowed).")
@click.option("--expansion", type=float, default=None, help="Latents = expansion * d (default 8).")
@click.option("--n-latents", type=int, default=None, help="Number of latents (instead of --expansion).")
@click.option("--reg", default="none", callback=_list(str, "reg"),
              help="Regularizer: none|off|ratio|both (off: off-support l1, ratio: l1/l2), or a list.")
@click.option("--beta", default=str(DEFAULT_BETA), callback=_list(float, "beta"), help="Off-support l1 weight(s).")
@click.option("--gamma", default=str(DEFAULT_GAMMA), callback=_list(float, "gamma"), help="l1/l2 ratio weight(s).")
@click.option("--reg-on", default="raw", callback=_list(str, "reg_on"),
              help="What the penalties measure: raw (|z|, negative pre-activations included, the paper's sample "
                   "code) or relu (relu(z), only what can enter the code), or a list.")
@click.option("--lr", type=float, default=None, help="Adam learning rate (default 2e-4 * sqrt(2^14 / n_latents) x m, m = 3 for runs "
              "up to 1,000 steps, falling as 1/steps to 1 at 3,000; see BENCHMARKS.md).")
@click.option("--batch-size", type=int, default=4096, show_default=True)
@click.option("--steps", type=int, default=None, help="Optimisation steps.")
@click.option("--epochs", type=float, default=None, help="Passes over the training rows (default 1).")
@click.option("--val-fraction", type=float, default=0.05, show_default=True, help="Images held out for validation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto|cuda|cuda:N|cpu")
@click.option("--out", default=None, help="Run directory (default runs/<store>-<layer>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its trainer_state.pt.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out.")
@click.option("--save-every", type=int, default=None,
              help="Steps between periodic checkpoints, which a killed run resumes from (default: a quarter of the "
              "run, at most 1000; 0: only at the end).")
@click.option("--warmup-steps", type=int, default=None, help="Linear LR warm-up (default min(1000, steps/10)).")
@click.option("--decay-frac", type=float, default=0.2, show_default=True, help="Linear LR decay over this last fraction.")
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option("--auxk-coeff", type=float, default=1 / 32, show_default=True)
@click.option("--dead-rows", type=int, default=None, help="Rows without firing before a latent counts as dead.")
@click.option("--log-every", type=int, default=50, show_default=True)
@click.option("--autocast", default="auto", show_default=True, help="auto (bf16 on CUDA)|bf16|off")
@click.option("--preload", default="auto", show_default=True, help="Hold all training rows on the device: auto|yes|no")
@click.option("--buffer-mb", type=int, default=2048, show_default=True, help="Streaming: shards per shuffle group, in MB (two groups are in memory: one read ahead).")
@click.option("--prefetch", type=int, default=4, show_default=True, help="Batches prepared ahead.")
@click.option("--stop-at-step", type=int, default=None, help="Save and stop at this step (continue with --resume).")
@click.option("--export-saelens", is_flag=True, help="Also write <run>/saelens/ (safetensors + cfg.json).")
@click.option("--export-sparsify", is_flag=True, help="Also write <run>/sparsify/ (sparsify's layout; topk runs).")
@click.option("--l1-coeff", type=float, default=None, help="relu: l1 weight (default 5 / d).")
@click.option("--softk-alpha", type=float, default=1e-4, show_default=True,
              help="softk: LapSum temperature, in the reference's units (inputs at E||x||^2 = 1; applied as "
                   "alpha * sqrt(d) to this trainer's E||x||^2 = d inputs).")
@click.option("--softk-weight", type=float, default=None,
              help="softk: k-penalty weight (default 1 / variance fraction: the reference's weight 1 in this "
                   "trainer's loss units). Runs need at least 2 x 200 + the hard phase (15%) steps for the k "
                   "anneal; the mean k then sits about one latent below --k (the penalty on the batch mean keeps "
                   "pushing): measured 14.5 at k = 16 after 200 steps on image embeddings. Train 1,500 steps or "
                   "more to compare it with Top-k.")
@click.option("--compile", "compile", is_flag=True, help="torch.compile each model's forward (worth it on a GPU).")
@click.option("--threads", type=int, default=None, help="CPU threads for the step (default: torch's; 1 is "
              "fastest when other processes share the cores).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@one_line_errors
def main(no_progress: bool, **kwargs) -> None:
    """Train sparse autoencoders on one layer of an activation store (several configurations in one pass)."""
    from visionsae.train.trainer import train

    paths = train(TrainConfig(progress=not no_progress, **kwargs))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        for p in paths:
            print(p)


if __name__ == "__main__":
    main()
