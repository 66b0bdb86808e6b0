"""What one ``sae-eval`` run does: a dataclass that is also the CLI's flag set."""

from __future__ import annotations

import dataclasses

from visionsae.errors import UserError

DEFAULT_OUT = "eval-report"


@dataclasses.dataclass
class EvalConfig:
    checkpoints: list[str]
    store: str | None = None  # None: the store each checkpoint records (meta["store"]["path"])
    k_sweep: tuple[int, ...] = (4, 8, 16, 32, 64, 128)  # inference-time k' values
    ms_embeddings: str | None = None  # a second store (another backbone, same images) for MS
    ms_embeddings_layer: str | None = None  # its layer; None: the only one, else the 'embedding' layer
    image_pooling: str = "max"  # token layers: a latent's per-image activation, max over tokens | cls (class token)
    probe_budgets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    max_images: int | None = None  # cap on held-out images and on probe-training images
    probe_train_images: int = 10_000  # probe-training images drawn from the non-held-out slots
    device: str = "auto"  # auto | cuda | cpu
    out: str = DEFAULT_OUT
    batch_rows: int = 4096  # rows per forward pass (whole images)
    top_images: int = 50  # top-activating images per latent, for purity and the explorer
    html_images: int = 12  # top images shown on a latent's page in the explorer (index.html)
    thumb_size: int = 64  # pixels
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if not self.checkpoints:
            raise UserError("no checkpoint given: pass one or more ckpt.pt files written by sae-train")
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
