"""Per-image sparse codes: the (image, latent, value) triples every image-level metric reads.

An SAE code is sparse (K of N latents per row), so the image-level metrics (MS, purity, top images,
probes) work on its non-zero entries instead of a dense I x N matrix: their cost then grows with
the number of firings, not with I * N. For token stores the per-image activation of a latent is its
MAXIMUM over the image's tokens by default (a latent "is in" an image as strongly as its strongest
token); ``pooling="cls"`` takes its activation on the class token instead (token 0 of each image in
stores with token_kind ``all``), as Pach et al. do for the Monosemanticity Score.

Shape suffixes: R rows (I images x T tokens), K kept per row, N latents, P non-zero entries,
G groups, M kept per group.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ImageCodes(NamedTuple):
    img_P: torch.Tensor  # int64 image (0 .. n_images-1, batch-local) of each non-zero entry
    lat_P: torch.Tensor  # int64 latent
    val_P: torch.Tensor  # activation, non-zero
    n_images: int
    n_latents: int

    @classmethod
    def from_dense(cls, a_IN: torch.Tensor) -> "ImageCodes":
        img_P, lat_P = a_IN.nonzero(as_tuple=True)
        return cls(img_P, lat_P, a_IN[img_P, lat_P], a_IN.shape[0], a_IN.shape[1])

    @classmethod
    def from_kept(cls, acts_RK: torch.Tensor, idx_RK: torch.Tensor, tokens_per_image: int,
                  n_latents: int, pooling: str = "max") -> "ImageCodes":
        """Pool an SAE's kept code (zeros are padding) over each image's tokens: the maximum, or ("cls")
        the class token's (token 0) code."""
        R, T = acts_RK.shape[0], tokens_per_image
        assert R % T == 0, f"{R} rows are not whole images of {T} tokens"
        assert pooling in ("max", "cls"), f"unknown pooling {pooling!r}"
        fires_RK = acts_RK > 0
        if pooling == "cls" and T > 1:
            first_R = torch.arange(R, device=acts_RK.device) % T == 0
            fires_RK = fires_RK & first_R[:, None]
        row_P = torch.arange(R, device=acts_RK.device)[:, None].expand_as(idx_RK)[fires_RK]
        lat_P, val_P = idx_RK[fires_RK], acts_RK[fires_RK]
        img_P = row_P // T
        if T > 1:
            key_P, inv_P = torch.unique(img_P * n_latents + lat_P, return_inverse=True)
            val_P = val_P.new_zeros(key_P.shape[0]).scatter_reduce_(0, inv_P, val_P, "amax", include_self=False)
            img_P, lat_P = key_P // n_latents, key_P % n_latents
        return cls(img_P, lat_P, val_P, R // T, n_latents)

    def dense(self) -> torch.Tensor:
        out_IN = self.val_P.new_zeros(self.n_images, self.n_latents)
        out_IN[self.img_P, self.lat_P] = self.val_P
        return out_IN


def top_per_group(group_P: torch.Tensor, val_P: torch.Tensor, payload_P: torch.Tensor, n_groups: int,
                  m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each group, its m largest values and their payloads: [G, m] each, in decreasing value.

    Groups with fewer than m entries are padded with value 0 and payload -1.
    """
    by_val = torch.argsort(val_P, descending=True, stable=True)
    by_group = by_val[torch.argsort(group_P[by_val], stable=True)]  # groups ascending, values descending
    g_P, v_P, p_P = group_P[by_group], val_P[by_group], payload_P[by_group]
    count_G = torch.bincount(g_P, minlength=n_groups)
    start_G = torch.cumsum(count_G, 0) - count_G
    rank_P = torch.arange(g_P.shape[0], device=g_P.device) - start_G[g_P]
    keep_P = rank_P < m
    vals_GM = val_P.new_zeros(n_groups, m)
    payload_GM = torch.full((n_groups, m), -1, dtype=payload_P.dtype, device=payload_P.device)
    vals_GM[g_P[keep_P], rank_P[keep_P]] = v_P[keep_P]
    payload_GM[g_P[keep_P], rank_P[keep_P]] = p_P[keep_P]
    return vals_GM, payload_GM
