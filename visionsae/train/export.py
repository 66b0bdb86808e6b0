"""Export a checkpoint in the layout SAELens loads with ``SAE.load_from_disk(dir)``.

    dir/sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]
                                  (+ threshold [d_sae] for jumprelu)
    dir/cfg.json                  architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
                                  normalize_activations, reshape_activations, k (topk), metadata

SAELens encodes (x - b_dec) @ W_enc + b_enc, as these models do, and the checkpoint's weights
already map raw activations (normalize_activations "none"). Mapping: topk -> "topk" with k; relu ->
"standard" (ReLU); batchtopk -> "jumprelu" with every threshold equal to the learned inference
threshold (keep z > threshold, exactly this model's inference rule). SoftSAE has no SAELens
counterpart (its k is per input) and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from visionsae.errors import UserError
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
        "metadata": {"sae_lens_version": SAELENS_CFG_VERSION, "model_name": store.get("fingerprint"),
                     "hook_name": store.get("layer"), "dataset_path": store.get("path")},
    }
    if arch == "topk":
        sae_cfg["k"] = cfg.k
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps(sae_cfg, indent=1) + "\n")
    return out
