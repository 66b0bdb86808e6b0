"""Per-latent statistics the explorer shows, gathered during the held-out pass at O(firings) per batch.

- the sum of each latent's per-image activations (its mean over the images it fires on);
- an exact histogram of those activations in log2 bins (``BINS_PER_OCTAVE`` per octave over
  2^LOW_OCTAVE .. 2^(LOW_OCTAVE + N_BINS / BINS_PER_OCTAVE)): the range of a latent need not be known
  in advance, so one pass suffices, and a latent's counts sum to the number of images it fires on;
- a uniform random sample (without replacement) of ``reservoir`` firing images per latent: each firing
  gets a seeded random key and the largest keys are kept (``purity.TopImages`` keeps them), so the
  images shown across activation quantiles are a fair sample, not the top of the list.

Shape suffixes (docs/methods.md): P non-zero (image, latent) entries, N latents, G histogram bins, S sampled images per latent.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from visionsae.evaluate.codes import ImageCodes
from visionsae.evaluate.purity import TopImages

BINS_PER_OCTAVE = 8  # bins 9% wide: a latent's firing range (an octave or a few) gets 8-30 bars
LOW_OCTAVE = -20  # activations below 2^-20 fall in bin 0, above 2^20 in the last bin
N_BINS = 320


class LatentExtras(NamedTuple):
    sum_act_N: np.ndarray  # float64: sum over images of the per-image activation
    n_fire_N: np.ndarray  # int64: images the latent fires on
    hist_NG: np.ndarray  # int64: images per log2 bin
    sample_slots_NS: np.ndarray  # int64: uniform sample of firing images' slots, -1 padding
    class_top_NJ: np.ndarray  # int64: the latent's most frequent classes over its firing images (-1 padding)
    class_count_NJ: np.ndarray  # int64: how many firing images of each
    class_total_N: np.ndarray  # int64: labelled firing images


def bin_edges() -> np.ndarray:
    """The N_BINS + 1 edges of the histogram bins."""
    return 2.0 ** (LOW_OCTAVE + np.arange(N_BINS + 1) / BINS_PER_OCTAVE)


def bin_of(val_P: torch.Tensor) -> torch.Tensor:
    b = torch.floor(torch.log2(val_P.double()) * BINS_PER_OCTAVE).long() - LOW_OCTAVE * BINS_PER_OCTAVE
    return b.clamp_(0, N_BINS - 1)


class LatentStatsAccumulator:
    def __init__(self, n_latents: int, reservoir: int = 32, seed: int = 0, device: torch.device | str = "cpu"):
        self.n_latents = n_latents
        self.sum_N = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.hist_NG = torch.zeros(n_latents * N_BINS, dtype=torch.int32, device=device)  # 21 MB at 16k latents
        self.sample = TopImages(n_latents, reservoir, device)
        self.gen = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def update(self, codes: ImageCodes, slots_I: torch.Tensor) -> None:
        lat_P, val_P = codes.lat_P, codes.val_P
        fire_P = val_P > 0
        lat_P, val_P, img_P = lat_P[fire_P], val_P[fire_P], codes.img_P[fire_P]
        self.sum_N.index_add_(0, lat_P, val_P.double())
        self.hist_NG.index_add_(0, lat_P * N_BINS + bin_of(val_P), torch.ones_like(lat_P, dtype=torch.int32))
        # keys in (0, 1]: TopImages treats 0 as "no image"
        key_P = 1.0 - torch.rand(lat_P.shape[0], generator=self.gen, device=lat_P.device)
        self.sample.update(ImageCodes(img_P, lat_P, key_P, codes.n_images, codes.n_latents), slots_I)

    def result(self, counts_NC: np.ndarray | None, top_classes: int = 8) -> LatentExtras:
        hist_NG = self.hist_NG.view(self.n_latents, N_BINS).cpu().numpy().astype(np.int64)
        _, slots_NS = self.sample.result()
        if counts_NC is not None and counts_NC.shape[1] > 0:
            j = min(top_classes, counts_NC.shape[1])
            order_NJ = np.argsort(-counts_NC, axis=1, kind="stable")[:, :j]
            count_NJ = np.take_along_axis(counts_NC, order_NJ, 1)
            top_NJ = np.where(count_NJ > 0, order_NJ, -1)
            total_N = counts_NC.sum(1)
        else:
            top_NJ = count_NJ = np.zeros((self.n_latents, 0), dtype=np.int64)
            total_N = np.zeros(self.n_latents, dtype=np.int64)
        return LatentExtras(self.sum_N.cpu().numpy(), hist_NG.sum(1), hist_NG, slots_NS,
                            top_NJ.astype(np.int64), count_NJ.astype(np.int64), total_N.astype(np.int64))
