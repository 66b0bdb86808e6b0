"""Class purity of latents, and the running top-activating images it is measured on.

Purity of a latent: among the images where it fires, the share that belong to its most frequent
class. Two versions are reported: over its top-M activating images (M = ``top_m``, only images
where it actually fires, only labelled images) and over every labelled image where it fires.

Purity is defined only for a latent with at least MIN_FIRING_IMAGES such images, the rule the
Monosemanticity Score follows (its pairwise sums are 0 / 0 below two images): a latent that fires on
one image has purity 1 by construction, and averaging those in would favour models with many rare
latents. Every average reports how many latents it covers.

Shape suffixes (docs/methods.md): I images in a batch, N latents, M kept top images per latent, C classes.
"""

from __future__ import annotations

import numpy as np
import torch

from visionsae.evaluate.codes import ImageCodes, top_per_group

MIN_FIRING_IMAGES = 2  # labelled firing images a latent needs for a purity (the MS rule)


class TopImages:
    """The M largest per-image activations of every latent, with the slots they came from."""

    def __init__(self, n_latents: int, top_m: int, device: torch.device | str = "cpu"):
        self.top_m = top_m
        self.vals_NM = torch.zeros((n_latents, top_m), dtype=torch.float32, device=device)
        self.slots_NM = torch.full((n_latents, top_m), -1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, codes: ImageCodes, slots_I: torch.Tensor) -> None:
        n_lat = self.vals_NM.shape[0]
        lat_P, val_P = codes.lat_P, codes.val_P.to(torch.float32)
        # Only entries above a latent's current M-th value can enter its list: after the first
        # batches few candidates are left, and only their latents' lists are merged.
        new_P = val_P > self.vals_NM[lat_P, -1]
        if not bool(new_P.any()):
            return
        cand_lat_P, cand_val_P = lat_P[new_P], val_P[new_P]
        cand_slot_P = slots_I.to(lat_P.device)[codes.img_P[new_P]]
        # the latents with candidates (A of them), and each candidate's latent among those, without a sort
        hit_N = torch.bincount(cand_lat_P, minlength=n_lat) > 0
        hit_A = hit_N.nonzero().squeeze(1)
        cand_pos_P = (torch.cumsum(hit_N, 0) - 1)[cand_lat_P]
        new_vals_AM, new_slots_AM = top_per_group(cand_pos_P, cand_val_P, cand_slot_P, hit_A.shape[0], self.top_m)
        vals_AX = torch.cat([self.vals_NM[hit_A], new_vals_AM], dim=1)
        slots_AX = torch.cat([self.slots_NM[hit_A], new_slots_AM], dim=1)
        top_AM, pos_AM = vals_AX.topk(self.top_m, dim=1)
        self.vals_NM[hit_A] = top_AM
        self.slots_NM[hit_A] = slots_AX.gather(1, pos_AM)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(values [L, M], slots [L, M]) in decreasing activation; value 0 / slot -1: no further firing image."""
        return self.vals_NM.cpu().numpy(), self.slots_NM.cpu().numpy()


class ClassCounts:
    """Per latent, how many labelled images of each class it fires on."""

    def __init__(self, n_latents: int, n_classes: int, device: torch.device | str = "cpu"):
        self.n_classes = n_classes
        self.counts_NC = torch.zeros((n_latents, n_classes), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, codes: ImageCodes, labels_I: torch.Tensor) -> None:
        lab_P = labels_I.to(codes.lat_P.device)[codes.img_P]
        use_P = (lab_P >= 0) & (codes.val_P > 0)
        flat_P = codes.lat_P[use_P] * self.n_classes + lab_P[use_P]
        self.counts_NC.view(-1).index_add_(0, flat_P, torch.ones_like(flat_P))

    def result(self) -> np.ndarray:
        return self.counts_NC.cpu().numpy()


def purity_from_counts(counts_NC: np.ndarray) -> np.ndarray:
    """max_c count / sum_c count per latent; NaN where it fires on fewer than MIN_FIRING_IMAGES labelled images."""
    counts_NC = np.asarray(counts_NC, dtype=np.float64)
    total_N = counts_NC.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total_N >= MIN_FIRING_IMAGES, counts_NC.max(1) / total_N, np.nan)


def purity_top(vals_NM: np.ndarray, labels_NM: np.ndarray, n_classes: int) -> np.ndarray:
    """Purity over each latent's top images (entries with value <= 0 or label < 0 are left out)."""
    use_NM = (vals_NM > 0) & (labels_NM >= 0)
    counts_NC = np.zeros((vals_NM.shape[0], n_classes), dtype=np.int64)
    rows_NM = np.broadcast_to(np.arange(vals_NM.shape[0])[:, None], vals_NM.shape)
    np.add.at(counts_NC, (rows_NM[use_NM], labels_NM[use_NM]), 1)
    return purity_from_counts(counts_NC)


def top_class(counts_NC: np.ndarray) -> np.ndarray:
    """Each latent's most frequent class over its firing images (-1 where it fires on none)."""
    return np.where(np.asarray(counts_NC).sum(1) > 0, np.asarray(counts_NC).argmax(1), -1)


def summarize(purity_N: np.ndarray, live_N: np.ndarray) -> dict:
    """Mean and median purity over live latents where it is defined, and how many latents that is."""
    vals = purity_N[live_N & ~np.isnan(purity_N)]
    return {"mean": float(vals.mean()) if len(vals) else float("nan"),
            "median": float(np.median(vals)) if len(vals) else float("nan"),
            "n_latents": int(len(vals))}
