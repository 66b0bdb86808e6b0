"""Monosemanticity Score (Pach et al. 2025) in linear time, with the quadratic definition as reference.

For latent l over I images with activations a_il, a~ = (a - min_i a) / (max_i a - min_i a), and
unit-norm image embeddings e_i:

    MS_l = sum_{i<j} a~_il a~_jl cos(e_i, e_j) / sum_{i<j} a~_il a~_jl

With U = sum_i a~_i, V = sum_i a~_i^2, W = sum_i a~_i e_i the numerator is (||W||^2 - V) / 2 and
the denominator (U^2 - V) / 2 (docs/methods.md section 6). The accumulator keeps the sums of the RAW
activations (and their running min / max), so one pass suffices: the min-max normalisation is
applied afterwards by expanding a~ = (a - lo) / r in U, V and W.

Shape suffixes (docs/methods.md): I images, N latents, E embedding width.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from visionsae.evaluate.codes import ImageCodes

# A denominator this small relative to U~^2 is a latent with a single non-minimal image: MS is
# undefined there (0 / 0), and rounding in the expansion must not turn it into a number.
RELATIVE_ZERO = 1e-9


def unit_rows(e_IE: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit l2 norm, in float64 (zero rows stay zero)."""
    e_IE = e_IE.to(torch.float64)
    return e_IE / e_IE.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def ms_quadratic(a_IN: np.ndarray, e_IE: np.ndarray) -> np.ndarray:
    """The O(I^2) definition, straight from the formula; NaN where the denominator is 0."""
    a_IN = np.asarray(a_IN, dtype=np.float64)
    e_IE = np.asarray(e_IE, dtype=np.float64)
    e_IE = e_IE / np.linalg.norm(e_IE, axis=1, keepdims=True)
    cos_II = e_IE @ e_IE.T
    upper_II = np.triu(np.ones_like(cos_II, dtype=bool), k=1)
    out_N = np.full(a_IN.shape[1], np.nan)
    for l in range(a_IN.shape[1]):
        a_I = a_IN[:, l]
        r = a_I.max() - a_I.min()
        if r <= 0:
            continue
        at_I = (a_I - a_I.min()) / r
        w_II = np.outer(at_I, at_I)[upper_II]
        den = w_II.sum()
        if den > 0:
            out_N[l] = (w_II * cos_II[upper_II]).sum() / den
    return out_N


def sparse_at_e(lat_P: torch.Tensor, img_P: torch.Tensor, a_P: torch.Tensor, e_IE: torch.Tensor, n_latents: int,
                backend: str = "auto") -> torch.Tensor:
    """A^T e for the sparse [I, L] matrix A given by its entries: cost (entries) x E, not I x L x E.

    ``backend`` auto: scipy's CSR product on CPU (about twice as fast as torch's sparse product
    there, measured), torch's on other devices; "torch" forces torch's (tests compare the two).
    """
    if backend == "auto" and a_P.device.type == "cpu":
        a_LI = sp.csr_matrix((a_P.numpy(), (lat_P.numpy(), img_P.numpy())), shape=(n_latents, e_IE.shape[0]))
        return torch.from_numpy(np.asarray(a_LI @ e_IE.numpy()))
    a_LI = torch.sparse_coo_tensor(torch.stack([lat_P, img_P]), a_P, (n_latents, e_IE.shape[0]),
                                   check_invariants=False)
    return torch.sparse.mm(a_LI, e_IE)


class MSAccumulator:
    """Running sums for the Monosemanticity Score of N latents, one batch of images at a time."""

    def __init__(self, n_latents: int, d_embed: int, device: torch.device | str = "cpu"):
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.sum_a_N = torch.zeros(n_latents, **f64)
        self.sum_a2_N = torch.zeros(n_latents, **f64)
        self.sum_ae_LE = torch.zeros(n_latents, d_embed, **f64)
        self.sum_e_E = torch.zeros(d_embed, **f64)
        self.sum_e_sq = torch.zeros((), **f64)
        self.lo_N = torch.full((n_latents,), torch.inf, **f64)
        self.hi_N = torch.full((n_latents,), -torch.inf, **f64)

    @torch.no_grad()
    def update(self, codes: ImageCodes, e_IE: torch.Tensor) -> None:
        """codes: the batch's per-image activations (non-zero entries); e_IE: embeddings (normalised here)."""
        n_img, n_lat = codes.n_images, codes.n_latents
        assert n_img == e_IE.shape[0], f"{n_img} images of activations vs {e_IE.shape[0]} embeddings"
        if n_img == 0:
            return
        e_IE = unit_rows(e_IE)
        lat_P, a_P = codes.lat_P, codes.val_P.to(torch.float64)
        self.n += n_img
        self.sum_a_N.index_add_(0, lat_P, a_P)
        self.sum_a2_N.index_add_(0, lat_P, a_P.square())
        self.sum_ae_LE += sparse_at_e(lat_P, codes.img_P, a_P, e_IE, n_lat)
        self.sum_e_E += e_IE.sum(0)
        self.sum_e_sq += e_IE.square().sum()
        # Entries left out of the sparse code are zeros: they bound min and max unless the latent is
        # non-zero on every image of the batch.
        full_N = torch.bincount(lat_P, minlength=n_lat) == n_img
        inf = torch.tensor(torch.inf, dtype=torch.float64, device=a_P.device)
        lo_N = torch.where(full_N, inf, 0.0).scatter_reduce_(0, lat_P, a_P, "amin")
        hi_N = torch.where(full_N, -inf, 0.0).scatter_reduce_(0, lat_P, a_P, "amax")
        self.lo_N = torch.minimum(self.lo_N, lo_N)
        self.hi_N = torch.maximum(self.hi_N, hi_N)

    def baseline(self) -> float:
        """The MS of a latent with the same activation on every image: the mean cosine over all image
        pairs. Embeddings of one backbone are rarely centred, so this is the level MS starts from."""
        n = self.n
        if n < 2:
            return float("nan")
        return float((self.sum_e_E.square().sum() - self.sum_e_sq) / (n * (n - 1)))

    def result(self) -> np.ndarray:
        """MS of every latent (float64 [L]); NaN where undefined (dead, constant, or one image)."""
        if self.n == 0:
            raise ValueError("no images were accumulated")
        lo_N, r_N, n = self.lo_N, self.hi_N - self.lo_N, self.n
        ok_N = r_N > 0
        r_N = torch.where(ok_N, r_N, torch.ones_like(r_N))
        u_N = (self.sum_a_N - n * lo_N) / r_N
        v_N = (self.sum_a2_N - 2 * lo_N * self.sum_a_N + n * lo_N.square()) / r_N.square()
        w_LE = (self.sum_ae_LE - lo_N[:, None] * self.sum_e_E[None, :]) / r_N[:, None]
        num_N = (w_LE.square().sum(1) - v_N) / 2
        den_N = (u_N.square() - v_N) / 2
        ok_N &= den_N > RELATIVE_ZERO * u_N.square()
        ms_N = torch.where(ok_N, num_N / torch.where(ok_N, den_N, torch.ones_like(den_N)),
                           torch.full_like(num_N, torch.nan))
        return ms_N.cpu().numpy()


def ms_linear(a_IN: np.ndarray, e_IE: np.ndarray) -> np.ndarray:
    """Linear-time MS of in-memory arrays (one accumulator update)."""
    a = torch.as_tensor(np.asarray(a_IN, dtype=np.float64))
    e = torch.as_tensor(np.asarray(e_IE, dtype=np.float64))
    acc = MSAccumulator(a.shape[1], e.shape[1])
    acc.update(ImageCodes.from_dense(a), e)
    return acc.result()


def summarize(ms_N: np.ndarray) -> dict:
    """Mean and median over the latents where MS is defined."""
    ok = ~np.isnan(ms_N)
    vals = ms_N[ok]
    return {"mean": float(vals.mean()) if len(vals) else float("nan"),
            "median": float(np.median(vals)) if len(vals) else float("nan"),
            "n_latents": int(ok.sum())}
