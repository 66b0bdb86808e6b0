"""Reconstruction and sparsity metrics as float64 running sums, so the figures are exact at any size.

Shape suffixes: B rows in a batch, D input width, N latents, K kept latents per row.

Every accumulator takes torch tensors on any device, keeps its sums there in float64 and hands
back plain Python floats / numpy arrays from ``result()``. Definitions (docs/methods.md section 7):

- ``mse``: mean over rows and dimensions of (x - x_hat)^2.
- ``fvu``: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, the mean taken over the evaluated rows;
  ``explained_variance`` = 1 - fvu.
- ``nmse``: mean over rows of ||x - x_hat||^2 / ||x||^2 (rows with x = 0 are left out and counted).
- ``cosine``: mean over rows of cos(x, x_hat); ``l2_ratio``: mean over rows of ||x_hat|| / ||x||.
- ``rel_bias``: relative reconstruction bias, E||x_hat||^2 / E<x, x_hat> (a ratio of sums).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from visionsae.sae.base import firing_counts, support_BN

# Latents firing on more than this share of rows are "dense" (docs/methods.md section 7).
DENSE_FRACTION = 0.1
# The code-mass share whose number of carrying latents is reported ("latents for 90% of the mass").
MASS_SHARE = 0.9
# Width of one bin of the log10 firing-density histogram, in decades.
DENSITY_BIN_WIDTH = 0.25
# SoftSAE's per-input k is continuous: its quantiles are read from bins 1 / K_BINS_PER_UNIT wide
# (a power of two, so k * K_BINS_PER_UNIT is exact and each bin lies inside one integer bin).
K_BINS_PER_UNIT = 256


class ReconAccumulator:
    """Float64 sums of everything the reconstruction metrics need."""

    def __init__(self, center_D: np.ndarray | torch.Tensor, device: torch.device | str = "cpu"):
        # Sums are taken of x - center (the store's layer mean): the variance of x is then a small
        # difference of small numbers rather than of two huge ones, whatever the data's offset.
        self.center_D = torch.as_tensor(np.asarray(center_D), dtype=torch.float64, device=device)
        d = self.center_D.shape[0]
        self.n = 0
        self.n_zero = 0  # rows with x = 0, left out of the per-row ratios
        self.sum_err = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_xc_D = torch.zeros(d, dtype=torch.float64, device=device)
        self.sum_xc_sq = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_hat_sq = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_dot = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_nmse = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_cos = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_ratio = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> None:
        assert x_BD.shape == x_hat_BD.shape, f"x {tuple(x_BD.shape)} vs x_hat {tuple(x_hat_BD.shape)}"
        x_BD = x_BD.to(torch.float64)
        x_hat_BD = x_hat_BD.to(torch.float64)
        err_B = (x_BD - x_hat_BD).square().sum(1)
        xc_BD = x_BD - self.center_D
        x_sq_B = x_BD.square().sum(1)
        hat_sq_B = x_hat_BD.square().sum(1)
        dot_B = (x_BD * x_hat_BD).sum(1)
        self.n += x_BD.shape[0]
        self.sum_err += err_B.sum()
        self.sum_xc_D += xc_BD.sum(0)
        self.sum_xc_sq += xc_BD.square().sum()
        self.sum_hat_sq += hat_sq_B.sum()
        self.sum_dot += dot_B.sum()
        ok_B = x_sq_B > 0
        self.n_zero += int((~ok_B).sum())
        x_sq_B, hat_sq_B, dot_B, err_B = x_sq_B[ok_B], hat_sq_B[ok_B], dot_B[ok_B], err_B[ok_B]
        x_norm_B, hat_norm_B = x_sq_B.sqrt(), hat_sq_B.sqrt()
        self.sum_nmse += (err_B / x_sq_B).sum()
        # cos is 0 where x_hat = 0 (no direction): the clamp only guards that division.
        self.sum_cos += (dot_B / (x_norm_B * hat_norm_B).clamp_min(torch.finfo(torch.float64).tiny)).sum()
        self.sum_ratio += (hat_norm_B / x_norm_B).sum()

    def result(self) -> dict[str, float]:
        n, d = self.n, self.center_D.shape[0]
        if n == 0:
            raise ValueError("no rows were accumulated")
        total_var = float(self.sum_xc_sq) - float(self.sum_xc_D.square().sum()) / n
        err = float(self.sum_err)
        fvu = err / total_var if total_var > 0 else math.nan
        n_ok = n - self.n_zero
        dot = float(self.sum_dot)
        return {
            "n_rows": n,
            "mse": err / (n * d),
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "nmse": float(self.sum_nmse) / n_ok if n_ok else math.nan,
            "cosine": float(self.sum_cos) / n_ok if n_ok else math.nan,
            "l2_ratio": float(self.sum_ratio) / n_ok if n_ok else math.nan,
            "rel_bias": float(self.sum_hat_sq) / dot if dot != 0 else math.nan,
            "n_zero_rows": self.n_zero,
        }


def code_concentration(z_BN: torch.Tensor, share: float = MASS_SHARE) -> tuple[torch.Tensor, torch.Tensor]:
    """(l1/l2 ratio, latents carrying ``share`` of the l1 mass) of each row's positive part of z.

    Top-k keeps the largest raw pre-activations and then applies ReLU, so only the positive part of
    z can ever enter the code: that is the code's candidate mass. Rows with no positive entry get
    NaN (the caller skips them). Results are float64 tensors on z's device.
    """
    z_BN = z_BN.detach().float()
    # The smallest m with (sum of the m largest) >= share * l1, found on the running sums of the
    # sorted row; the relative slack keeps rounding from adding one latent where the sums tie.
    slack = 1 - 1e-12
    if z_BN.device.type == "cpu":
        # numpy's row sort is several times faster than torch's on CPU (measured: 0.1 s vs 1.1 s
        # for 2048 x 8192), and this sort is the costliest step of an evaluation pass.
        pos_BN = np.maximum(z_BN.numpy(), 0)
        # Only the positive entries carry mass: the running sums stop at the batch's longest positive part.
        n_pos = max(int((pos_BN > 0).sum(1).max(initial=0)), 1)
        cum_BN = np.cumsum(np.sort(pos_BN, axis=1)[:, ::-1][:, :n_pos], axis=1, dtype=np.float64)
        l1_B = cum_BN[:, -1]
        n_below_B = (cum_BN < (share * slack * l1_B)[:, None]).sum(1)
        l2_B = np.sqrt(np.square(pos_BN, dtype=np.float64).sum(1))
        l1_B, l2_B, n_below_B = (torch.from_numpy(np.ascontiguousarray(v)) for v in (l1_B, l2_B, n_below_B))
    else:
        pos_BN = z_BN.clamp_min(0)
        cum_BN = pos_BN.sort(dim=1, descending=True).values.cumsum(1, dtype=torch.float64)
        l1_B = cum_BN[:, -1]
        n_below_B = (cum_BN < (share * slack * l1_B).unsqueeze(1)).sum(1)
        l2_B = pos_BN.to(torch.float64).square().sum(1).sqrt()
    nan_B = torch.full_like(l1_B, math.nan)
    ratio_B = torch.where(l2_B > 0, l1_B / l2_B, nan_B)
    n_mass_B = torch.where(l1_B > 0, n_below_B.to(torch.float64) + 1, nan_B)
    return ratio_B, n_mass_B


class SparsityAccumulator:
    """L0, per-latent firing counts, code concentration and (SoftSAE) the per-input k."""

    def __init__(self, n_latents: int, device: torch.device | str = "cpu"):
        self.n_latents = n_latents
        self.n = 0
        self.sum_l0 = 0
        self.fire_N = torch.zeros(n_latents, dtype=torch.int64, device=device)
        self.sum_ratio = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_mass = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_kept_mass = torch.zeros((), dtype=torch.float64, device=device)
        self.n_conc = 0
        self.n_kept = 0
        # SoftSAE's per-row k as a bounded summary (it was a float64 per row, 2 GB at 252M rows)
        self.k_dist: KDistribution | None = None

    @torch.no_grad()
    def update(self, z_BN: torch.Tensor, acts_BK: torch.Tensor, idx_BK: torch.Tensor,
               k_B: torch.Tensor | None) -> None:
        fires_BK = acts_BK > 0
        self.n += acts_BK.shape[0]
        self.sum_l0 += int(fires_BK.sum())
        self.fire_N += firing_counts(acts_BK, idx_BK, self.n_latents).to(self.fire_N.device)
        ratio_B, mass_B = code_concentration(z_BN)
        ok_B = ~torch.isnan(ratio_B)
        self.sum_ratio += ratio_B[ok_B].sum()
        self.sum_mass += mass_B[ok_B].sum()
        self.n_conc += int(ok_B.sum())
        # The same count on the kept code: how many of the kept latents carry 90% of its mass.
        _, kept_mass_B = code_concentration(acts_BK)
        ok_B = ~torch.isnan(kept_mass_B)
        self.sum_kept_mass += kept_mass_B[ok_B].sum()
        self.n_kept += int(ok_B.sum())
        if k_B is not None:
            self.k_dist = self.k_dist or KDistribution()
            self.k_dist.update(k_B.detach().to("cpu", torch.float64).reshape(-1).numpy())

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("no rows were accumulated")
        fire_N = self.fire_N.cpu().numpy()
        density_N = fire_N / self.n
        live = fire_N > 0
        out = {
            "l0": self.sum_l0 / self.n,
            "n_latents": self.n_latents,
            "dead": int((~live).sum()),
            "dead_fraction": float((~live).mean()),
            "dense": int((density_N > DENSE_FRACTION).sum()),
            "dense_fraction": float((density_N > DENSE_FRACTION).mean()),
            "l1_l2_ratio": float(self.sum_ratio) / self.n_conc if self.n_conc else math.nan,
            "latents_for_mass": float(self.sum_mass) / self.n_conc if self.n_conc else math.nan,
            "kept_latents_for_mass": float(self.sum_kept_mass) / self.n_kept if self.n_kept else math.nan,
            "mass_share": MASS_SHARE,
            "density_histogram": density_histogram(density_N[live], self.n),
        }
        if self.k_dist is not None and self.k_dist.n:
            out["k_distribution"] = self.k_dist.result()
        return out

    def density_N(self) -> np.ndarray:
        return self.fire_N.cpu().numpy() / max(self.n, 1)


def density_histogram(density_N: np.ndarray, n_rows: int) -> dict:
    """Histogram of log10 firing density over live latents; the range starts at one firing in n_rows."""
    low = math.floor(math.log10(1.0 / n_rows) / DENSITY_BIN_WIDTH) * DENSITY_BIN_WIDTH
    edges = np.arange(low, DENSITY_BIN_WIDTH / 2, DENSITY_BIN_WIDTH)
    if edges[-1] < 0:  # include 0 (fires on every row) in the last bin
        edges = np.append(edges, 0.0)
    counts, _ = np.histogram(np.log10(density_N), bins=edges)
    return {"log10_edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def k_distribution(k_R: np.ndarray) -> dict:
    """Summary and integer-bin histogram of the per-input k of a SoftSAE, from all values in memory (the
    definition KDistribution streams; sae-eval uses KDistribution)."""
    q = np.quantile(k_R, [0.05, 0.25, 0.5, 0.75, 0.95])
    lo, hi = int(math.floor(k_R.min())), int(math.floor(k_R.max()))
    counts, edges = np.histogram(k_R, bins=np.arange(lo, hi + 2))
    return {"mean": float(k_R.mean()), "std": float(k_R.std()), "min": float(k_R.min()),
            "max": float(k_R.max()), "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]),
            "q75": float(q[3]), "q95": float(q[4]),
            "hist_edges": [int(e) for e in edges], "hist_counts": [int(c) for c in counts]}


class KDistribution:
    """``k_distribution`` of every row seen, from a summary whose size depends on k's range, not on the rows.

    Exact (to float64 rounding): the count, mean and std (per-batch moments merged as Chan et al. do), min,
    max and the integer-bin histogram. The quantiles are np.quantile's linear interpolation between order
    statistics, each order statistic taken as the centre of its bin 1 / K_BINS_PER_UNIT wide (clipped to
    [min, max]): within half a bin (0.002) of np.quantile on the values themselves, which a bounded one-pass
    summary cannot reproduce for continuous values. Memory: 8 bytes per bin over [floor(min), floor(max) + 1),
    i.e. 2 KB per unit of k's range (k <= k_max <= n_latents).
    """

    def __init__(self):
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.lo, self.hi = math.inf, -math.inf
        self.first_bin = 0  # fine bin of counts_F[0]
        self.counts_F = np.zeros(0, dtype=np.int64)

    def update(self, k_R: np.ndarray) -> None:
        k_R = np.asarray(k_R, dtype=np.float64).reshape(-1)
        if k_R.size == 0:
            return
        n_b, mean_b = k_R.size, float(k_R.mean())
        m2_b = float(np.square(k_R - mean_b).sum())
        delta, n = mean_b - self.mean, self.n + n_b
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n
        self.lo, self.hi = min(self.lo, float(k_R.min())), max(self.hi, float(k_R.max()))
        fine_R = np.floor(k_R * K_BINS_PER_UNIT).astype(np.int64)
        # the bins cover whole units, so the integer histogram is a sum of whole blocks
        first = int(math.floor(self.lo)) * K_BINS_PER_UNIT
        size = (int(math.floor(self.hi)) + 1) * K_BINS_PER_UNIT - first
        if first != self.first_bin or size != self.counts_F.size:
            grown = np.zeros(size, dtype=np.int64)
            at = self.first_bin - first
            grown[at:at + self.counts_F.size] = self.counts_F
            self.first_bin, self.counts_F = first, grown
        self.counts_F += np.bincount(fine_R - first, minlength=size)

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("no k values were accumulated")
        cum_F = np.cumsum(self.counts_F)
        centre_F = (self.first_bin + np.arange(self.counts_F.size) + 0.5) / K_BINS_PER_UNIT

        def order_stat(j: int) -> float:  # the j-th smallest value (0-based), as its bin's centre
            return float(np.clip(centre_F[np.searchsorted(cum_F, j, side="right")], self.lo, self.hi))

        qs = []
        for q in (0.05, 0.25, 0.5, 0.75, 0.95):
            h = (self.n - 1) * q
            j = int(math.floor(h))
            a, b = order_stat(j), order_stat(min(j + 1, self.n - 1))
            qs.append(a + (h - j) * (b - a))
        counts_U = self.counts_F.reshape(-1, K_BINS_PER_UNIT).sum(1)
        lo_u = self.first_bin // K_BINS_PER_UNIT
        return {"mean": self.mean, "std": math.sqrt(self.m2 / self.n), "min": self.lo, "max": self.hi,
                "q05": qs[0], "q25": qs[1], "median": qs[2], "q75": qs[3], "q95": qs[4],
                "hist_edges": list(range(lo_u, lo_u + counts_U.size + 1)),
                "hist_counts": [int(c) for c in counts_U], "quantile_bin": 1.0 / K_BINS_PER_UNIT}


class TrainedPenalties:
    """The two regularizers' quantities as a checkpoint was trained (train/regularizers.py), measured here.

    Per evaluation batch: A = union of the rows' supports in the batch, then the means over rows of
    sum_{j in A minus S_i} m_ij (off-support l1) and ||m_iA||_1 / (||m_iA||_2 + 1e-8), with m = |z|
    ("raw") or relu(z) ("relu"), as the checkpoint records. A grows with the batch, so the figures are
    for batches of the evaluation's size. ``l1_l2_ratio`` of SparsityAccumulator is a different
    quantity: the positive part of z over all latents, which is what a Top-k code can draw on.
    """

    def __init__(self, on: str, device: torch.device | str = "cpu"):
        assert on in ("raw", "relu"), f"unknown penalty measure {on!r}"
        self.on = on
        self.n = 0
        self.sum_off = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_ratio = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, z_BN: torch.Tensor, idx_BK: torch.Tensor, support_BK: torch.Tensor | None) -> None:
        m_BN = (z_BN if self.on == "raw" else z_BN.relu()).abs().to(torch.float64)
        S_BN = support_BN(idx_BK, m_BN.shape[1], support_BK)
        A_N = S_BN.any(0)
        mA_BN = torch.where(A_N[None, :], m_BN, torch.zeros_like(m_BN))
        l1_B = mA_BN.sum(1)
        l2_B = mA_BN.square().sum(1).sqrt()
        self.sum_off += torch.where(S_BN, torch.zeros_like(mA_BN), mA_BN).sum()
        self.sum_ratio += (l1_B / (l2_B + 1e-8)).sum()
        self.n += m_BN.shape[0]

    def result(self) -> dict:
        n = max(self.n, 1)
        return {"on": self.on, "off_support_l1": float(self.sum_off) / n, "l1_l2_ratio": float(self.sum_ratio) / n}
