"""Everything measured on one checkpoint, fed one batch of whole images at a time.

The encoder runs once per batch: the pre-activations z_BN feed the plain metrics at the training
k and, through ``sparsify(z, x, k')`` + ``decode``, every k' of the sweep (the same computation as
``model(x, k=k')``, without repeating the encoder matmul).

Shape suffixes: R rows (I images x T tokens), D width, N latents, K kept, E embedding width.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from visionsae.errors import UserError
from visionsae.evaluate import monosemanticity, purity
from visionsae.evaluate.codes import ImageCodes
from visionsae.evaluate.latent_stats import LatentExtras, LatentStatsAccumulator
from visionsae.evaluate.inputs import Checkpoint
from visionsae.evaluate.metrics import ReconAccumulator, SparsityAccumulator, TrainedPenalties
from visionsae.evaluate.probes import TopCodes
from visionsae.sae.base import SAEOutput
from visionsae.store import LayerInfo


@dataclasses.dataclass
class LatentTables:
    """Per-latent arrays kept for the HTML page (also written, as lists, to report.json)."""

    firing_rate_N: np.ndarray  # share of rows where the latent fires
    image_rate_N: np.ndarray  # share of images where it fires on some token
    ms_N: np.ndarray  # NaN where undefined
    purity_top_N: np.ndarray
    purity_all_N: np.ndarray
    top_class_N: np.ndarray  # -1: fires on no labelled image
    top_vals_NM: np.ndarray  # per-image activation of the top images, decreasing
    top_slots_NM: np.ndarray  # their store slots
    extras: LatentExtras | None = None  # histograms, samples, class lists for the explorer


class ModelEval:
    def __init__(self, ck: Checkpoint, info: LayerInfo, d_embed: int, n_classes: int,
                 k_sweep: tuple[int, ...], max_budget: int, top_images: int, device: torch.device,
                 pooling: str = "max", probes: bool = True, probe_spill: Path | None = None):
        self.ck, self.model, self.T, self.pooling = ck, ck.model, info.tokens_per_image, pooling
        n = int(ck.config["n_latents"])
        self.n_latents, self.n_classes = n, n_classes
        self.recon = ReconAccumulator(info.mean, device)
        self.sparsity = SparsityAccumulator(n, device)
        # checkpoints from before --reg-on were all trained on |z| ("raw")
        self.penalties = TrainedPenalties((ck.meta.get("train") or {}).get("reg_on", "raw"), device)
        self.k_sweep = tuple(k for k in k_sweep if k <= n)
        self.sweep_skipped = [k for k in k_sweep if k > n]
        self.sweep_note: str | None = None
        self.sweep = {k: ReconAccumulator(info.mean, device) for k in self.k_sweep}
        self.sweep_l0 = {k: 0 for k in self.k_sweep}
        self.ms = monosemanticity.MSAccumulator(n, d_embed, device)
        self.top = purity.TopImages(n, top_images, device)
        self.counts = purity.ClassCounts(n, n_classes, device) if n_classes else None
        # the held-out images' top codes (only when probes run), in a file under probe_spill when given:
        # they are the one table here that grows with the images
        self.codes_eval = TopCodes(max_budget, probe_spill) if probes else None
        self.codes_train = TopCodes(max_budget)
        self.image_fire_N = torch.zeros(n, dtype=torch.int64, device=device)
        self.latent_stats = LatentStatsAccumulator(n, device=device)
        self.n_images = 0

    @torch.no_grad()
    def update_eval(self, x_RD: torch.Tensor, e_IE: torch.Tensor, slots_I: torch.Tensor,
                    labels_I: torch.Tensor) -> None:
        z_RN = self.model.encode_pre(x_RD)
        acts_RK, idx_RK, k_R = self.model.sparsify(z_RN, x_RD, None)
        self.recon.update(x_RD, self.model.decode(acts_RK, idx_RK))
        self.sparsity.update(z_RN, acts_RK, idx_RK, k_R)
        support_RK = self.model.support_mask(SAEOutput(None, z_RN, acts_RK, idx_RK, k_R))
        self.penalties.update(z_RN, idx_RK, support_RK)
        self._update_sweep(x_RD, z_RN)
        codes = ImageCodes.from_kept(acts_RK, idx_RK, self.T, self.n_latents, self.pooling)
        self.n_images += codes.n_images
        self.image_fire_N += torch.bincount(codes.lat_P, minlength=self.n_latents)
        self.ms.update(codes, e_IE)
        self.top.update(codes, slots_I)
        self.latent_stats.update(codes, slots_I)
        if self.counts is not None:
            self.counts.update(codes, labels_I)
        if self.codes_eval is not None:
            self._update_codes(self.codes_eval, acts_RK, idx_RK, codes)

    def _update_sweep(self, x_RD: torch.Tensor, z_RN: torch.Tensor) -> None:
        if self.sweep_note is not None:
            return
        for k in self.k_sweep:
            try:
                acts_RK, idx_RK, _ = self.model.sparsify(z_RN, x_RD, k)
            except (NotImplementedError, UserError) as err:
                # e.g. a ReLU SAE has no k to change: say so in the report instead of failing the run.
                self.sweep_note = f"the {self.ck.config['arch']} model does not take an inference-time k: {err}"
                return
            self.sweep[k].update(x_RD, self.model.decode(acts_RK, idx_RK))
            self.sweep_l0[k] += int((acts_RK > 0).sum())

    @torch.no_grad()
    def update_train(self, x_RD: torch.Tensor) -> None:
        """Probe-training images: only their pooled code is needed."""
        acts_RK, idx_RK = self.model.encode(x_RD)
        self._update_codes(self.codes_train, acts_RK, idx_RK, None)

    def _update_codes(self, top: TopCodes, acts_RK: torch.Tensor, idx_RK: torch.Tensor,
                      codes: ImageCodes | None) -> None:
        if self.T == 1:  # one row per image: its kept code is already the image's code
            top.update_rows(acts_RK, idx_RK)
        else:
            top.update(codes if codes is not None
                       else ImageCodes.from_kept(acts_RK, idx_RK, self.T, self.n_latents, self.pooling))

    def finish(self, labels_of_slot: np.ndarray) -> tuple[dict, LatentTables]:
        sparsity = {**self.sparsity.result(), "trained_penalties": self.penalties.result()}
        density_N = self.sparsity.density_N()
        live_N = density_N > 0
        ms_N = self.ms.result()
        top_vals, top_slots = self.top.result()
        if self.counts is not None:
            counts_NC = self.counts.result()
            purity_all = purity.purity_from_counts(counts_NC)
            top_labels = np.where(top_slots >= 0, labels_of_slot[np.maximum(top_slots, 0)], -1)
            purity_top = purity.purity_top(top_vals, top_labels, self.n_classes)
            top_class = purity.top_class(counts_NC)
            purity_summary = {"top": {**purity.summarize(purity_top, live_N), "top_images": self.top.top_m},
                              "all": purity.summarize(purity_all, live_N)}
        else:
            purity_all = purity_top = np.full(self.n_latents, np.nan)
            top_class = np.full(self.n_latents, -1)
            purity_summary = {"skipped": "the store has no class labels"}
        sweep = {}
        for k in self.k_sweep if self.sweep_note is None else ():
            sweep[str(k)] = {**self.sweep[k].result(), "l0": self.sweep_l0[k] / self.sweep[k].n}
        tables = LatentTables(
            firing_rate_N=density_N, image_rate_N=self.image_fire_N.cpu().numpy() / max(self.n_images, 1),
            ms_N=ms_N, purity_top_N=purity_top, purity_all_N=purity_all, top_class_N=top_class,
            top_vals_NM=top_vals, top_slots_NM=top_slots,
            extras=self.latent_stats.result(counts_NC if self.counts is not None else None))
        summary = {
            "reconstruction": self.recon.result(),
            "sparsity": sparsity,
            "k_sweep": sweep,
            "k_sweep_note": self.sweep_note or (f"k' above n_latents skipped: {self.sweep_skipped}"
                                                if self.sweep_skipped else None),
            "monosemanticity": {**monosemanticity.summarize(np.where(live_N, ms_N, np.nan)),
                                "baseline_mean_cosine": self.ms.baseline()},
            "purity": purity_summary,
            "n_images": self.n_images,
        }
        return summary, tables

