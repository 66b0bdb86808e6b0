"""The Monosemanticity Score's image embedding (issue 13, item 3): own layer is circular, an independent
encoder is not, and every report says which one produced the figure."""

from __future__ import annotations

import numpy as np
import torch

from visionsae.evaluate import EvalConfig, evaluate
from visionsae.evaluate.report import write_report
from visionsae.sae import build_sae, save_checkpoint
from visionsae.sae.registry import resolve_config
from visionsae.store import write_array_store

torch.set_num_threads(1)


def test_random_sae_scores_ms_zero_with_an_independent_encoder(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 1500, 16
    x = rng.standard_normal((n, d)).astype(np.float32)  # isotropic: no structure an SAE could find
    store = write_array_store(tmp_path / "a", {"emb": x}, images_per_shard=512)
    # an unrelated backbone over the same images: independent Gaussian embeddings
    write_array_store(tmp_path / "b", {"other": rng.standard_normal((n, 32)).astype(np.float32)},
                      backbone_id="independent", images_per_shard=512)
    torch.manual_seed(0)
    model = build_sae(resolve_config("topk", d, 64, 4))  # untrained
    ck = tmp_path / "ckpt.pt"
    save_checkpoint(ck, model, input_scale=1.0,
                    store={"path": str(store.path), "fingerprint": store.fingerprint,
                           "layer_fingerprint": store.layer_fingerprint("emb"), "layer": "emb", "d": d},
                    split={"val_slots": torch.arange(n), "val_fraction": 1.0, "seed": 0}, train={}, step=0, metrics={})
    common = dict(k_sweep=(), probe_budgets=(), progress=False)
    own = evaluate(EvalConfig([str(ck)], **common))
    other = evaluate(EvalConfig([str(ck)], ms_embeddings=str(tmp_path / "b"), **common))
    ms_own = own.checkpoints[0].summary["monosemanticity"]
    ms_other = other.checkpoints[0].summary["monosemanticity"]
    assert ms_own["n_latents"] > 50 and ms_other["n_latents"] == ms_own["n_latents"]
    assert ms_own["mean"] > 0.05  # circular: a latent's images are close in the very space it reads
    assert abs(ms_other["mean"]) < 0.01  # an independent encoder sees nothing in a random SAE
    # the report names the encoder beside every MS figure
    assert own.groups[0].summary["ms_encoder"] == "own layer (emb)"
    assert other.groups[0].summary["ms_encoder"] == "independent/other"
    files = write_report(other, tmp_path / "rep")
    table = [line for line in files["md"].read_text().splitlines() if line.startswith("| ")]
    header = [h.strip() for h in table[0].strip("|").split("|")]
    row = [v.strip() for v in table[1].strip("|").split("|")]
    assert row[header.index("MS e_n")] == "independent/other" and header.index("MS e_n") == header.index("MS median") + 1


def test_class_token_pooling_is_offered_for_token_layers(tmp_path):
    """--image-pooling cls: a latent's per-image activation is its class-token activation (Pach et al.),
    against the default maximum over tokens; MS checked against the quadratic definition."""
    from visionsae.evaluate.monosemanticity import ms_quadratic
    rng = np.random.default_rng(1)
    n, T, d = 80, 4, 6
    x = rng.standard_normal((n * T, d)).astype(np.float32)
    store = write_array_store(tmp_path / "tok", {"blocks": x}, tokens_per_image=T, images_per_shard=16)
    torch.manual_seed(0)
    model = build_sae(resolve_config("topk", d, 24, 3))
    ck = tmp_path / "c.pt"
    save_checkpoint(ck, model, input_scale=1.0,
                    store={"path": str(store.path), "fingerprint": store.fingerprint,
                           "layer_fingerprint": store.layer_fingerprint("blocks"), "layer": "blocks", "d": d},
                    split={"val_slots": torch.arange(n), "val_fraction": 1.0, "seed": 0}, train={}, step=0, metrics={})
    common = dict(k_sweep=(), probe_budgets=(), batch_rows=8 * T, progress=False)
    with torch.no_grad():
        code = model.eval().dense_code(*model.encode(torch.from_numpy(x))).view(n, T, -1)
    e = x.reshape(n, T, d)[:, 0]  # token_kind 'all': the class token is the image vector
    for pooling, a_IN in (("max", code.amax(1).numpy()), ("cls", code[:, 0].numpy())):
        res = evaluate(EvalConfig([str(ck)], image_pooling=pooling, **common))
        live = (a_IN > 0).sum(0) >= 2
        np.testing.assert_allclose(res.checkpoints[0].tables.ms_N[live], ms_quadratic(a_IN, e)[live], rtol=1e-9)
        assert ("class token" in res.groups[0].summary["pooling"]) == (pooling == "cls")
