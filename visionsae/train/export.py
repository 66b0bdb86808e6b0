"""Export a checkpoint in the layout SAELens loads with ``SAE.load_from_disk(dir)``.

    dir/sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]
                                  (+ threshold [d_sae] for jumprelu)
    dir/cfg.json                  architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
                                  normalize_activations, reshape_activations, k (topk), metadata

SAELens encodes (x - b_dec) @ W_enc + b_enc, as these models do, and the checkpoint's weights
already map raw activations (normalize_activations "none"). Each variant declares its own mapping
(``saelens_export`` / ``sparsify_export`` in its module: topk -> "topk" with k, relu -> "standard",
batchtopk -> "jumprelu" with its fitted threshold) or refuses in one line (SoftSAE, whose k is per input);
this module knows no variant by name. ``metadata.model_name`` is the backbone's id; the store's
fingerprint is ``metadata.store_fingerprint``.

``export_sparsify`` writes the layout EleutherAI sparsify's ``SparseCoder.load_from_disk(dir)`` reads:

    dir/sae.safetensors   encoder.weight [N, D], encoder.bias [N], W_dec [N, D], b_dec [D]   (float32)
    dir/cfg.json          d_in, num_latents, k, activation "topk", normalize_decoder, and the other
                          SparseCoderConfig fields at the values that mean "a plain Top-k SAE"

Only Top-k has that counterpart (sae/topk.py says why it is exact); the other variants are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from visionsae.errors import StoreError
from visionsae.sae.checkpoint import load_checkpoint

# The cfg.json layout written here is SAELens' 6.x one (a nested "metadata" object).
SAELENS_CFG_VERSION = "6.0.0"


def export_saelens(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    model, meta = load_checkpoint(ckpt_path)
    cfg = model.cfg
    arch, tensors, arch_cfg = model.saelens_export()  # the variant's mapping, or its one-line refusal
    store = meta.get("store", {})
    sae_cfg = {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_CFG_VERSION, "model_name": _backbone_name(meta),
                     "hook_name": store.get("layer"), "dataset_path": store.get("path"),
                     "store_fingerprint": store.get("fingerprint")},
        **arch_cfg,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps(sae_cfg, indent=1) + "\n")
    return out


def export_sparsify(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    model, _ = load_checkpoint(ckpt_path)
    tensors, sparsify_cfg = model.sparsify_export()  # the variant's mapping, or its one-line refusal
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
