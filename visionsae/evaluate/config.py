"""What one ``sae-eval`` run does: a dataclass that is also the CLI's flag set (cli_options)."""

from __future__ import annotations

import dataclasses

from visionsae.cli_options import option
from visionsae.errors import UserError

DEFAULT_OUT = "eval-report"


@dataclasses.dataclass
class EvalConfig:
    checkpoints: list[str] = option(cli=False)  # sae-eval's arguments
    store: str | None = option(None, help="Activation store to read instead of the one each checkpoint records: "
                               "the same store moved, or a sibling with the same backbone "
                               "and layer over other images (e.g. the test split), all of whose images are then "
                               "evaluated on.")
    k_sweep: tuple[int, ...] = option((4, 8, 16, 32, 64, 128), help="Inference-time k' values to re-measure "
                                      "reconstruction at ('' for none).",
                                      parse=lambda text: parse_int_list(text, "--k-sweep"))
    ms_embeddings: str | None = option(None, path=True, help="Store of another backbone over the same images, whose "
                                       "image-level vectors the Monosemanticity Score compares images with (default: "
                                       "the evaluated layer's own).")
    ms_embeddings_layer: str | None = option(None, help="Layer of --ms-embeddings to use (default: its only layer, "
                                             "or its 'embedding' layer).")
    image_pooling: str = option("max", choices=("max", "cls"), help="Token layers: a latent's per-image activation "
                                "(MS, purity, top images, probes) is its maximum over the image's tokens, or its "
                                "activation on the class token (Pach et al.; stores with --tokens all).")
    probe_budgets: tuple[int, ...] = option((1, 2, 4, 8, 16, 32), help="Latents kept per image for the linear "
                                            "probes ('' for no probes).",
                                            parse=lambda text: parse_int_list(text, "--probe-budgets"))
    max_images: int | None = option(None, help="Use at most N held-out images and N probe-training images (seeded "
                                    "random subsets). Default: every held-out image.")
    probe_train_images: int = option(10_000, help="Probe-training images drawn from the images outside the "
                                     "held-out split.")
    device: str = option("auto", choices=("auto", "cuda", "cpu"))
    out: str = option(DEFAULT_OUT, path="dir", help="Report directory (created; report files in it are replaced).")
    batch_rows: int = option(4096, help="Rows per forward pass (whole images).")
    top_images: int = option(50, help="Top images per latent for purity and the page.")
    html_images: int = option(12, cli=False)  # top images shown on a latent's page in the explorer (index.html)
    thumb_size: int = option(64, cli=False)  # pixels
    seed: int = option(0)
    progress: bool = option(True, off="--quiet", help="No progress bars.")

    def validate(self) -> None:
        if not self.checkpoints:
            raise UserError("no checkpoint given: pass ckpt.pt files or sae-train output directories")
        for name, values in (("--k-sweep", self.k_sweep), ("--probe-budgets", self.probe_budgets)):
            if any(int(v) < 1 for v in values):
                raise UserError(f"{name} values must be positive integers, got {','.join(map(str, values))}")
        if self.max_images is not None and self.max_images < 1:
            raise UserError(f"--max-images must be at least 1, got {self.max_images}")
        if self.image_pooling not in ("max", "cls"):
            raise UserError(f"--image-pooling must be max or cls, got '{self.image_pooling}'")
        if self.device not in ("auto", "cuda", "cpu"):
            raise UserError(f"--device must be auto, cuda or cpu, got '{self.device}'")
        for name in ("batch_rows", "top_images", "probe_train_images", "thumb_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")


# Per-latent constants of the tables sae-eval keeps (latent_stats.py, the explorer's sample, the k summary).
_HIST_BINS = 320  # latent_stats.N_BINS
_SAMPLE = 32  # latent_stats reservoir: firing images sampled per latent
_K_BIN_BYTES = 2048  # metrics.KDistribution: 8 bytes x 256 bins per unit of k (k <= n_latents)
_BATCH_ENTRY = 48  # bytes per (row, latent) of a batch's dense pre-activations and what is derived from them
_LBFGS_VECTORS = 25  # L-BFGS-B keeps 2 x 10 correction pairs + ~5 vectors of the probe's size


@dataclasses.dataclass
class GroupShape:
    """What a group of checkpoints (one store layer, one pass) makes sae-eval hold: none of it is a row count."""

    n_latents: list[int]  # per checkpoint
    softk: list[bool]  # per checkpoint: keeps SoftSAE's k summary and its k estimator
    d: int  # layer width
    tokens: int  # rows per image
    n_classes: int
    d_embed: int  # width of the MS embeddings
    probe_train: int  # probe-training images (0: no probes)
    embed_tokens: int = 0  # rows per image of the --ms-embeddings layer (0: none, the evaluated layer's own)


def eval_memory(cfg: EvalConfig, groups: list[GroupShape]) -> dict[str, int]:
    """Bytes of every table sae-eval holds, by name, at their largest. A function of latents, classes, widths,
    --top-images, --batch-rows, the probes' settings and the number of checkpoints, never of the images or rows
    evaluated (the held-out codes for the probes go to a temporary file, 8 bytes x the largest budget per image
    and checkpoint; per-image indices and labels, tens of bytes per image, are the store's).

    - models: every checkpoint's parameters (loaded for the whole run; again for the explorer);
    - accumulators (one group's checkpoints, during its pass): top images 12 M n, sampled images 12 S n, the
      activation histogram 4 x 320 n, class counts 8 C n, MS sums 8 (E + 4) n, counters, SoftSAE's k summary;
    - batch (one checkpoint at a time): 48 bytes per row and latent (dense pre-activations, their sort, float64
      sums), the merge of top images, the rows;
    - tables: every checkpoint's finished per-latent tables, kept until the report is written;
    - finishing (one checkpoint): class counts sorted and recounted, the histogram in int64;
    - probe_inputs (one group): probe-training vectors and codes; probe_fit: one L-BFGS fit over C x features;
    - explorer: one checkpoint's shown pairs, (T + ~270) bytes per pair, 44 pairs per latent, and every
      checkpoint's decoder directions.
    """
    M, B, budget = cfg.top_images, cfg.batch_rows, max(cfg.probe_budgets, default=0)
    shown = cfg.html_images + _SAMPLE
    out = dict.fromkeys(("models", "accumulators", "batch", "tables", "finishing", "probe_inputs", "probe_fit",
                         "explorer"), 0)
    for g in groups:
        cks = list(zip(g.n_latents, g.softk))
        out["models"] += sum(n * g.d * 4 * (3 if soft else 2) for n, soft in cks)
        out["accumulators"] = max(out["accumulators"], sum(
            n * (12 * M + 12 * _SAMPLE + 4 * _HIST_BINS + 8 * g.n_classes + 8 * (g.d_embed + 4) + 48)
            + (n * _K_BIN_BYTES if soft else 0) for n, soft in cks))
        rows = max(g.tokens, B // g.tokens * g.tokens)  # whole images per batch
        # --ms-embeddings rows are read batch_rows at a time (whole images) beside the batch
        other = max(B, g.embed_tokens) * g.d_embed * 8 if g.embed_tokens else 0
        out["batch"] = max(out["batch"], max(rows * n * _BATCH_ENTRY + n * M * 24 + rows * g.d * 16 + other
                                             for n in g.n_latents))
        out["tables"] += sum(n * (12 * M + 8 * _HIST_BINS + 8 * _SAMPLE + 224) for n in g.n_latents)
        out["finishing"] = max(out["finishing"], max(n * (8 * _HIST_BINS + 24 * g.n_classes) for n in g.n_latents))
        if g.probe_train and budget:
            P, C = g.probe_train, max(g.n_classes, 2)
            out["probe_inputs"] = max(out["probe_inputs"], P * g.d * 4 * 3 + len(cks) * P * budget * 12)
            features = max([min(n, P * budget) for n in g.n_latents] + [g.d])
            out["probe_fit"] = max(out["probe_fit"], (_LBFGS_VECTORS * C * (features + 1) + 4 * P * C) * 8)
        out["explorer"] = max(out["explorer"], max(n * shown * (g.tokens + 270) for n in g.n_latents))
    out["explorer"] += sum(n * g.d * 4 for g in groups for n in g.n_latents)
    return out


def peak_memory(tables: dict[str, int], on_device: bool) -> tuple[int, int]:
    """(device bytes, host bytes) at the peak; on the CPU the two are one memory (host 0, all on 'device').

    A group's pass holds the models, its accumulators, the tables so far and the probe inputs, plus one of a
    batch, a probe fit or a finishing step; the explorer runs after, with the tables and its own pairs."""
    t = tables
    if not on_device:
        return max(t["models"] + t["accumulators"] + t["tables"] + t["probe_inputs"]
                   + max(t["batch"], t["probe_fit"], t["finishing"]),
                   t["tables"] + t["models"] + t["explorer"]), 0
    return (t["models"] + t["accumulators"] + t["batch"],
            t["tables"] + t["probe_inputs"] + max(t["probe_fit"], t["finishing"], t["explorer"]))


# what to lower when a table is the largest
_LOWER = {"models": "evaluate fewer checkpoints at once",
          "accumulators": "evaluate fewer checkpoints at once, or lower --top-images (class counts and MS sums are "
                          "per latent and checkpoint)",
          "batch": "lower --batch-rows", "tables": "lower --top-images, or evaluate fewer checkpoints at once",
          "finishing": "evaluate fewer checkpoints at once", "probe_inputs": "lower --probe-train-images",
          "probe_fit": "lower --probe-train-images or --probe-budgets ('' for no probes)",
          "explorer": "evaluate fewer checkpoints at once"}


def check_memory(cfg: EvalConfig, groups: list[GroupShape], device_bytes: int, where: str,
                 host_bytes: int | None = None) -> None:
    """Refuse, before any pass, an evaluation whose tables cannot fit (eval_memory). ``host_bytes`` None: the
    device is this machine's memory."""
    tables = eval_memory(cfg, groups)
    dev, host = peak_memory(tables, host_bytes is not None)
    on_device = ("models", "accumulators", "batch")
    for need, have, name, keys in ((dev, device_bytes, where, on_device if host_bytes is not None else tables),
                                   (host, host_bytes, "this machine's memory", set(tables) - set(on_device))):
        if have is not None and need > have:
            big = max(keys, key=tables.get)
            n = sum(len(g.n_latents) for g in groups)
            raise UserError(f"--top-images {cfg.top_images} and --batch-rows {cfg.batch_rows} for {n} checkpoint(s) "
                            f"of up to {max(max(g.n_latents) for g in groups):,} latents need about "
                            f"{need / 2**30:,.1f} GiB ({name} has {have / 2**30:,.1f} GiB; the largest table, {big}, "
                            f"{tables[big] / 2**30:,.1f} GiB): {_LOWER[big]}")


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """'4,8,16' -> (4, 8, 16); an empty string -> () (e.g. no k-sweep)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers such as 4,8,16, got '{text}'") from None
    return tuple(sorted(set(values)))
