"""What the explorer shows about each latent that the metrics pass does not already hold.

- decoder directions (``model.decode`` of a unit code minus the decoder bias, so any variant works) and
  each latent's nearest latents by their cosine, in the same checkpoint and in another checkpoint of the
  same layer (best match, and whether the match is mutual);
- per-token activations of a latent on the images shown for it, recomputed from the store rows of those
  images (one encoder pass per distinct image, however many latents show it);
- with a classifier head fed by the layer: the classes a decoder direction promotes and suppresses
  (``W_head @ d_l``), and for the latent's top images the exact change of the logits when the latent is
  removed from the image's activation (x - a_l d_l: the head is linear, so the change is -a_l W_head d_l).

Shape suffixes: N latents, D width, K kept, P (latent, image) pairs, T tokens, I images, C classes, J nearest.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from visionsae.sae import SparseAutoencoder
from visionsae.store import Store
from visionsae.store.extras import ClassifierHead


@torch.no_grad()
def decoder_directions(model: SparseAutoencoder, n_latents: int, device: torch.device,
                       block: int = 4096) -> torch.Tensor:
    """[N, D] float32: what each latent adds to the reconstruction per unit of activation (raw input space).
    Through ``decode`` minus the output bias, the one decoding method every SparseAutoencoder has
    (``decode_latents`` is optional)."""
    zero_K = torch.zeros(1, 1, device=device)
    bias_D = model.decode(zero_K, torch.zeros(1, 1, dtype=torch.int64, device=device))[0]
    parts = []
    for a in range(0, n_latents, block):
        idx_B1 = torch.arange(a, min(a + block, n_latents), device=device)[:, None]
        parts.append(model.decode(torch.ones(idx_B1.shape, device=device), idx_B1) - bias_D)
    return torch.cat(parts).float()


def _unit(x_ND: torch.Tensor) -> torch.Tensor:
    return x_ND / x_ND.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def nearest(a_ND: torch.Tensor, b_MD: torch.Tensor, j: int, same: bool, block: int = 2048
            ) -> tuple[np.ndarray, np.ndarray]:
    """For each row of a, the j rows of b with the largest cosine (itself excluded when ``same``)."""
    a_ND, b_MD = _unit(a_ND), _unit(b_MD)
    j = min(j, b_MD.shape[0] - (1 if same else 0))
    idx, cos = [], []
    for s in range(0, a_ND.shape[0], block):
        sim_BM = a_ND[s:s + block] @ b_MD.T
        if same:
            rows = torch.arange(sim_BM.shape[0], device=sim_BM.device)
            sim_BM[rows, rows + s] = -torch.inf
        c_BJ, i_BJ = sim_BM.topk(j, dim=1)
        idx.append(i_BJ.cpu())
        cos.append(c_BJ.cpu())
    return torch.cat(idx).numpy(), torch.cat(cos).numpy()


class Match(NamedTuple):
    """Latent i of checkpoint a is most like latent idx_N[i] of checkpoint b (decoder cosine cos_N[i])."""

    idx_N: np.ndarray
    cos_N: np.ndarray
    mutual_N: np.ndarray  # bool: i is also b's latent's best match in a


def match(a_ND: torch.Tensor, b_MD: torch.Tensor) -> tuple[Match, Match]:
    """Best matches both ways between two checkpoints of one layer."""
    ab_idx, ab_cos = nearest(a_ND, b_MD, 1, same=False)
    ba_idx, ba_cos = nearest(b_MD, a_ND, 1, same=False)
    ab_idx, ab_cos, ba_idx, ba_cos = ab_idx[:, 0], ab_cos[:, 0], ba_idx[:, 0], ba_cos[:, 0]
    return (Match(ab_idx, ab_cos, ba_idx[ab_idx] == np.arange(len(ab_idx))),
            Match(ba_idx, ba_cos, ab_idx[ba_idx] == np.arange(len(ba_idx))))


@torch.no_grad()
def class_effects(dirs_ND: torch.Tensor, head: ClassifierHead, j: int, block: int = 4096
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(up_idx, up_val, down_idx, down_val) [N, j]: the classes whose logit each direction raises / lowers most."""
    W_DC = torch.from_numpy(head.weight_CD).to(dirs_ND.device).T
    j = max(1, min(j, W_DC.shape[1] // 2))  # the two lists never share a class
    out: list[list[torch.Tensor]] = [[], [], [], []]
    for s in range(0, dirs_ND.shape[0], block):
        eff_BC = dirs_ND[s:s + block] @ W_DC
        uv, ui = eff_BC.topk(j, dim=1)
        dv, di = (-eff_BC).topk(j, dim=1)
        for lst, t in zip(out, (ui, uv, di, -dv)):
            lst.append(t.cpu())
    return tuple(torch.cat(t).numpy() for t in out)  # type: ignore[return-value]


def head_applies(head: ClassifierHead | None, layer_kind: str, d: int, tokens_per_image: int) -> bool:
    """The head reads this layer's rows: a pooled embedding of the head's width."""
    return (head is not None and head.attrs.get("input") == "embedding" and layer_kind == "embedding"
            and tokens_per_image == 1 and int(head.attrs["d"]) == d)


class PairValues(NamedTuple):
    tokens_PT: np.ndarray | None  # float32: the latent's activation at each token of the image (None: quantised)
    # with a head (else None): for the pairs asked for, the image's predicted class and its logit, the change
    # of that logit when the latent is removed, and the prediction after removal
    pred_P: np.ndarray | None
    logit_P: np.ndarray | None
    dlogit_P: np.ndarray | None
    new_pred_P: np.ndarray | None
    # quantised=True: float32 max over the tokens and value at token 0 (exact), and uint8 levels of every
    # token on the pair's own scale (rint(255 * a / max_P), 0 where max_P is 0): 1 byte per token, not 4
    max_P: np.ndarray | None = None
    first_P: np.ndarray | None = None
    levels_PT: np.ndarray | None = None


def levels(tokens_QT: np.ndarray, scale_Q: np.ndarray) -> np.ndarray:
    """uint8 rint(255 * a / scale) clipped to 0..255 (0 where scale is 0): the heatmap quantisation."""
    scale_Q = np.asarray(scale_Q, dtype=np.float64)
    ok_Q = scale_Q > 0
    q_QT = np.rint(255 * tokens_QT / np.where(ok_Q, scale_Q, 1.0)[:, None])
    return np.where(ok_Q[:, None], np.clip(q_QT, 0, 255), 0).astype(np.uint8)


@torch.no_grad()
def pair_values(model: SparseAutoencoder, store: Store, layer: str, slot_P: np.ndarray, lat_P: np.ndarray,
                device: torch.device, batch_rows: int = 4096, head: ClassifierHead | None = None,
                dirs_ND: torch.Tensor | None = None, ablate_P: np.ndarray | None = None,
                pair_block: int = 2048, quantised: bool = False) -> PairValues:
    """Per-token activations of latent lat_P[p] on image slot_P[p], from one encoder pass per distinct image.

    ``quantised``: keep them as uint8 levels per pair (with each pair's exact max and token-0 value), which
    is all the explorer shows: P x T bytes instead of P x T float32 (570 MB at 16k latents x 44 images shown
    x 197 tokens)."""
    T = store.layer(layer).tokens_per_image
    P = len(slot_P)
    tokens_PT = None if quantised else np.zeros((P, T), dtype=np.float32)
    quant = (np.zeros(P, np.float32), np.zeros(P, np.float32), np.zeros((P, T), np.uint8)) if quantised else ()
    with_head = head is not None and dirs_ND is not None and ablate_P is not None
    if with_head:
        pred_P, logit_P = np.full(P, -1, np.int64), np.zeros(P, np.float32)
        dlogit_P, new_pred_P = np.zeros(P, np.float32), np.full(P, -1, np.int64)
        W_CD = torch.from_numpy(head.weight_CD).to(device)
        b_C = torch.from_numpy(head.bias_C).to(device)
        # every latent's class effect at once where it fits (16k latents x 1000 classes: 64 MB), else per pair
        eff_NC = dirs_ND @ W_CD.T if dirs_ND.shape[0] * W_CD.shape[0] <= 2**26 else None
    heads = (pred_P, logit_P, dlogit_P, new_pred_P) if with_head else (None,) * 4
    if P == 0:
        return PairValues(tokens_PT, *heads, *quant)
    uniq_U, inv_P = np.unique(slot_P, return_inverse=True)
    order = np.argsort(inv_P, kind="stable")
    per_batch = max(1, batch_rows // T)
    for u0 in range(0, len(uniq_U), per_batch):
        u1 = min(u0 + per_batch, len(uniq_U))
        x_RD = torch.from_numpy(store.read_slots(layer, uniq_U[u0:u1])).to(device)
        acts_RK, idx_RK = model.encode(x_RD)
        K = acts_RK.shape[1]
        acts_ITK, idx_ITK = acts_RK.view(u1 - u0, T, K), idx_RK.view(u1 - u0, T, K)
        if with_head:
            logits_UC = x_RD.view(u1 - u0, T, -1)[:, 0].float() @ W_CD.T + b_C
        lo, hi = np.searchsorted(inv_P[order], [u0, u1])
        for c0 in range(lo, hi, pair_block):
            sel = order[c0:min(c0 + pair_block, hi)]
            img_Q = torch.from_numpy(inv_P[sel] - u0).to(device)
            lat_Q = torch.from_numpy(lat_P[sel]).to(device)
            hit_QTK = idx_ITK[img_Q] == lat_Q[:, None, None]
            tok_QT = (acts_ITK[img_Q] * hit_QTK).sum(-1).float().cpu().numpy()
            if quantised:
                max_P, first_P, levels_PT = quant
                max_P[sel], first_P[sel] = tok_QT.max(1), tok_QT[:, 0]
                levels_PT[sel] = levels(tok_QT, max_P[sel])
            else:
                tokens_PT[sel] = tok_QT
            if with_head:
                abl = ablate_P[sel]
                if abl.any():
                    q = sel[abl]
                    img = img_Q[torch.from_numpy(abl).to(device)]
                    logits_QC = logits_UC[img]
                    pred = logits_QC.argmax(1)
                    a_Q = torch.from_numpy(tok_QT[abl, 0]).to(device)
                    lat_q = torch.from_numpy(lat_P[q]).to(device)
                    # the head is linear: removing a * d_l changes the logits by -a * (W d_l)
                    eff_QC = eff_NC[lat_q] if eff_NC is not None else dirs_ND[lat_q] @ W_CD.T
                    delta_QC = -a_Q[:, None] * eff_QC
                    pred_P[q] = pred.cpu().numpy()
                    logit_P[q] = logits_QC.gather(1, pred[:, None])[:, 0].cpu().numpy()
                    dlogit_P[q] = delta_QC.gather(1, pred[:, None])[:, 0].cpu().numpy()
                    new_pred_P[q] = (logits_QC + delta_QC).argmax(1).cpu().numpy()
    return PairValues(tokens_PT, *heads, *quant)


def patch_grid(tokens_per_image: int, token_kind: str) -> tuple[int, int, int] | None:
    """(first patch token, rows, cols) of a square patch grid, or None when the layer has no spatial tokens."""
    first = 1 if token_kind == "all" else 0
    if token_kind not in ("all", "patches", "spatial"):
        return None
    n = tokens_per_image - first
    side = int(round(n ** 0.5))
    return (first, side, side) if side * side == n and n > 1 else None
