"""Export a checkpoint in the layout SAELens loads with ``SAE.load_from_disk(dir)``.

    dir/sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]
                                  (+ threshold [d_sae] for jumprelu)
    dir/cfg.json                  architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
                                  normalize_activations, reshape_activations, k (topk), metadata

SAELens encodes (x - b_dec) @ W_enc + b_enc, as these models do, and the checkpoint's weights
already map raw activations (normalize_activations "none"). Mapping: topk -> "topk" with k; relu ->
"standard" (ReLU); batchtopk -> "jumprelu" with every threshold equal to the learned inference
threshold (keep z > threshold, exactly this model's inference rule). SoftSAE has no SAELens
counterpart (its k is per input) and is refused. ``rescale_acts_by_decoder_norm`` is true: it scales
each latent by its decoder row's norm, which is 1 here (to float32 rounding), so it changes nothing and
lets SAELens fold the decoder norm (``SAE.load_from_disk(dir, fold_W_dec_norm=True)``), which it refuses
for Top-k otherwise. ``metadata.model_name`` is the backbone's id; the store's fingerprint is
``metadata.store_fingerprint``.

``export_sparsify`` writes the layout EleutherAI sparsify's ``SparseCoder.load_from_disk(dir)`` reads:

    dir/sae.safetensors   encoder.weight [N, D], encoder.bias [N], W_dec [N, D], b_dec [D]   (float32)
    dir/cfg.json          d_in, num_latents, k, activation "topk", normalize_decoder, and the other
                          SparseCoderConfig fields at the values that mean "a plain Top-k SAE"

sparsify computes topk(relu(W (x - b_dec) + b)); this Top-k keeps the k largest of z and ReLUs them,
the same code wherever fewer than k latents are positive too (those extra entries are zeros). Only
Top-k has that counterpart: BatchTopK's inference threshold, ReLU and SoftSAE are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from visionsae.errors import StoreError, UserError
from visionsae.sae.checkpoint import load_checkpoint

# The cfg.json layout written here is SAELens' 6.x one (a nested "metadata" object).
SAELENS_CFG_VERSION = "6.0.0"


def export_saelens(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    model, meta = load_checkpoint(ckpt_path)
    cfg = model.cfg
    arch = {"topk": "topk", "relu": "standard", "batchtopk": "jumprelu"}.get(cfg.arch)
    if arch is None:
        raise UserError(f"a '{cfg.arch}' SAE has no SAELens architecture (SoftSAE picks k per input): "
                        "evaluate it with sae-eval instead")
    tensors = {"W_enc": model.W_enc.detach().t().contiguous(), "W_dec": model.W_dec.detach().contiguous(),
               "b_enc": model.b_enc.detach().contiguous(), "b_dec": model.b_dec.detach().contiguous()}
    if arch == "jumprelu":
        thr = float(model.threshold.clamp_min(0))
        tensors["threshold"] = torch.full((cfg.n_latents,), thr, dtype=model.W_dec.dtype)
    store = meta.get("store", {})
    sae_cfg = {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_CFG_VERSION, "model_name": _backbone_name(meta),
                     "hook_name": store.get("layer"), "dataset_path": store.get("path"),
                     "store_fingerprint": store.get("fingerprint")},
    }
    if arch == "topk":
        sae_cfg["k"] = cfg.k
        sae_cfg["rescale_acts_by_decoder_norm"] = True  # a no-op: decoder rows are unit norm
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps(sae_cfg, indent=1) + "\n")
    return out


def export_sparsify(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    model, meta = load_checkpoint(ckpt_path)
    cfg = model.cfg
    if cfg.arch != "topk":
        raise UserError(f"a '{cfg.arch}' SAE has no sparsify counterpart (sparsify's coders are plain Top-k): "
                        "export a topk run, or use --export-saelens")
    tensors = {"encoder.weight": model.W_enc.detach().contiguous(),
               "encoder.bias": model.b_enc.detach().contiguous(), "W_dec": model.W_dec.detach().contiguous(),
               "b_dec": model.b_dec.detach().contiguous()}
    # SparseCoderConfig's fields; expansion_factor is unused when num_latents is set, so it is the ratio
    # rounded (an int field), for a reader that shows it.
    sparsify_cfg = {"activation": "topk", "expansion_factor": max(1, round(cfg.n_latents / cfg.d_in)),
                    "normalize_decoder": True, "num_latents": cfg.n_latents, "k": cfg.k, "multi_topk": False,
                    "skip_connection": False, "transcode": False, "d_in": cfg.d_in}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "sae.safetensors"), metadata={"format": "pt"})
    (out / "cfg.json").write_text(json.dumps(sparsify_cfg, indent=1) + "\n")
    return out


def _backbone_name(meta: dict) -> str | None:
    """The backbone's id (e.g. ``timm:vit_base_patch16_224``): recorded in the checkpoint, or, for a
    checkpoint older than that record, read from its store if the store is still there."""
    store = meta.get("store", {})
    if store.get("backbone"):
        return store["backbone"]
    from visionsae.store import open_store
    try:
        return open_store(store["path"]).backbone.get("id")
    except (KeyError, OSError, StoreError):
        return None
