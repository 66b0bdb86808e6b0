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


def check_memory(cfg: EvalConfig, n_latents: list[int], device_bytes: int, where: str) -> None:
    """Refuse, before allocating, tables that cannot fit: every checkpoint keeps its top images per latent
    (value and slot, twice while merging) for the whole pass; one at a time holds a batch of dense codes."""
    need = sum(n * cfg.top_images * 12 * 2 for n in n_latents) + max(3 * cfg.batch_rows * n * 4 for n in n_latents)
    if need > device_bytes:
        raise UserError(f"--top-images {cfg.top_images} and --batch-rows {cfg.batch_rows} over {sum(n_latents)} latents "
                        f"need about {need / 2**30:,.1f} GiB ({where} has {device_bytes / 2**30:,.1f} GiB): lower them")


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """'4,8,16' -> (4, 8, 16); an empty string -> () (e.g. no k-sweep)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers such as 4,8,16, got '{text}'") from None
    return tuple(sorted(set(values)))
