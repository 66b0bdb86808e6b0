"""End to end: stores and checkpoints on disk -> evaluate -> report files, with answers known in advance.

Most tests use a tiny SAE defined here ("eval_test_signed"), so they do not depend on how the real
variants are trained or initialised: its latents are the positive and negative parts of each input
coordinate, so with k = d it reconstructs exactly and at k' < d it keeps the k' largest |x_i|.
"""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from visionsae.evaluate import EvalConfig, evaluate, run
from visionsae.evaluate.cli import main
from visionsae.evaluate.monosemanticity import ms_quadratic
from conftest import save_eval_checkpoint
from visionsae.sae import SAEConfig, SparseAutoencoder, build_sae
from visionsae.sae.registry import register, resolve_config
from visionsae.store import write_array_store

N_CLASSES, D = 4, 8


@register
class SignedSAE(SparseAutoencoder):
    """z = (x - b, b - x); keep the k largest, ReLU; x_hat = positive part - negative part + b."""

    arch = "eval_test_signed"

    def __init__(self, cfg):
        super().__init__(cfg)
        assert cfg.n_latents == 2 * cfg.d_in
        self.b = nn.Parameter(torch.zeros(cfg.d_in))

    def encode_pre(self, x_BD):
        return torch.cat([x_BD - self.b, self.b - x_BD], dim=1)

    def sparsify(self, z_BN, x_BD, k=None):
        vals_BK, idx_BK = z_BN.topk(self.cfg.k if k is None else k, dim=1)
        return vals_BK.relu(), idx_BK, None

    def decode(self, acts_BK, idx_BK):
        dense_BN = self.dense_code(acts_BK, idx_BK)
        return dense_BN[:, :self.cfg.d_in] - dense_BN[:, self.cfg.d_in:] + self.b


def make_data(n=400, T=1, seed=0):
    """Class c puts a large value on coordinate c (of every token); labels, rows [n * T, D]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, n)
    x = np.zeros((n * T, D), dtype=np.float32)
    x[np.arange(n * T), np.repeat(labels, T)] = 5.0 + rng.random(n * T)
    x += rng.normal(scale=0.3, size=x.shape).astype(np.float32)
    return labels, x




def signed(k):
    return build_sae(SAEConfig(arch="eval_test_signed", d_in=D, n_latents=2 * D, k=k))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One store (dataset id 'digits', so thumbnails re-read from scikit-learn), two checkpoints, one run."""
    tmp = tmp_path_factory.mktemp("evalrun")
    labels, x = make_data()
    store = write_array_store(tmp / "store", {"emb": x}, labels, images_per_shard=64, dataset_id="digits")
    val = np.arange(200, 400)
    cks = [save_eval_checkpoint(tmp / "exact" / "ckpt.pt", store, "emb", signed(D), val),
           save_eval_checkpoint(tmp / "k2" / "ckpt.pt", store, "emb", signed(2), val)]
    cfg = EvalConfig(cks, out=str(tmp / "report"), k_sweep=(2, 4, D), probe_budgets=(1, 2), batch_rows=64,
                     top_images=20, progress=False)
    return tmp, store, x, labels, cfg, run(cfg)


def test_exact_model_known_metrics(digits_run):
    _, _, x, _, _, res = digits_run
    exact = res.checkpoints[0].summary
    rec = exact["reconstruction"]
    assert rec["n_rows"] == 200 and rec["fvu"] == 0.0 and rec["mse"] == 0.0
    assert rec["cosine"] == pytest.approx(1.0) and rec["l2_ratio"] == pytest.approx(1.0)
    assert rec["rel_bias"] == pytest.approx(1.0)
    assert exact["sparsity"]["l0"] == D  # exactly d of the 2d signed parts are positive


def test_k_sweep_at_training_k_equals_plain_metrics(digits_run):
    _, _, x, _, _, res = digits_run
    for ck in res.checkpoints:
        k = ck.summary["config"]["k"]
        sweep = dict(ck.summary["k_sweep"][str(k)])
        assert sweep.pop("l0") == ck.summary["sparsity"]["l0"]
        assert sweep == ck.summary["reconstruction"]


def test_k_sweep_below_d_drops_smallest_coordinates(digits_run):
    _, _, x, _, _, res = digits_run
    xv = x[200:400].astype(np.float64)
    kept = np.zeros_like(xv)
    top = np.argsort(-np.abs(xv), axis=1)[:, :4]
    np.put_along_axis(kept, top, np.take_along_axis(xv, top, 1), 1)
    fvu = ((xv - kept) ** 2).sum() / ((xv - xv.mean(0)) ** 2).sum()
    assert res.checkpoints[0].summary["k_sweep"]["4"]["fvu"] == pytest.approx(fvu, rel=1e-6)


def test_purity_and_probes_known_answers(digits_run):
    _, _, _, _, _, res = digits_run
    ck = res.checkpoints[0]
    # latent c is "coordinate c positive": its top images are exactly the class-c images
    assert ck.tables.purity_top_N[:N_CLASSES].tolist() == [1.0] * N_CLASSES
    assert ck.tables.top_class_N[:N_CLASSES].tolist() == list(range(N_CLASSES))
    probes = ck.summary["probes"]
    assert probes["budgets"]["1"]["accuracy"] == 1.0  # the largest latent names the class
    assert probes["raw"]["accuracy"] == 1.0 and probes["n_test"] == 200 and probes["n_train"] == 200


def test_report_files_parse_and_html_shows_the_sample(digits_run):
    tmp, _, _, _, cfg, res = digits_run
    out = Path(cfg.out)
    doc = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in doc["checkpoints"]] == ["exact", "k2"]
    assert doc["checkpoints"][1]["config"]["k"] == 2 and doc["groups"][0]["held_out_images"] == 200
    assert len(doc["checkpoints"][0]["latents"]["ms"]) == 2 * D
    md = (out / "report.md").read_text()
    main_table = md.split("## Data")[0]
    rows = [line for line in main_table.splitlines() if line.startswith("| exact") or line.startswith("| k2")]
    assert len(rows) == 2 and "FVU k'=2" in main_table
    for png in ("fvu_vs_k.png", "probe_vs_budget.png", "firing_density.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "index.html").read_text()
    assert "explorer/app.js" in page and (out / "explorer" / "data" / "meta.js").is_file()
    for i, c in enumerate(res.checkpoints):  # every latent of every checkpoint is in the explorer's table
        table = (out / "explorer" / "data" / f"c{i}" / "table.js").read_text()
        assert table.startswith(f"VSAE.table({i},") and table.count(",") >= len(c.tables.firing_rate_N)
    thumbs = list((out / "thumbs").glob("*.png"))
    assert thumbs and all(p.read_bytes()[:4] == b"\x89PNG" for p in thumbs)


def test_html_renders_in_headless_browser(digits_run, tmp_path):
    """Without selenium: Chromium's own --dump-dom of the explorer opened on a latent (test_eval_explorer.py
    drives the page with selenium)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium installed: the page is only checked as text")
    _, _, _, _, cfg, res = digits_run
    lat = int(np.argmax(res.checkpoints[1].tables.firing_rate_N))
    page = (Path(cfg.out) / "index.html").resolve()
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          page.as_uri() + f"#c=1&l={lat}"],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="latent"') == 1 and f'data-latent="{lat}"' in dom
    assert dom.count('class="thumb"') > 0 and 'class="noimg"' not in dom
    n_rows = len(res.checkpoints[1].tables.firing_rate_N)
    assert f"{n_rows} of {n_rows} latents" in dom


def test_token_store_pooling_and_ms_against_definition(tmp_path):
    T = 3
    labels, x = make_data(n=90, T=T, seed=1)
    store = write_array_store(tmp_path / "tok", {"blocks": x}, labels, tokens_per_image=T, images_per_shard=16)
    val = np.arange(30, 90, 2)
    ck = save_eval_checkpoint(tmp_path / "c.pt", store, "blocks", signed(3), val)
    res = evaluate(EvalConfig([ck], k_sweep=(), probe_budgets=(), batch_rows=4 * T, progress=False))
    c = res.checkpoints[0]
    model = signed(3).eval()
    with torch.no_grad():
        rows = torch.from_numpy(store.read_slots("blocks", val))
        code = model.dense_code(*model.encode(rows))
    a_IN = code.view(len(val), T, -1).amax(1).numpy()  # documented pooling: max over tokens
    e_ID = rows.view(len(val), T, D)[:, 0].numpy()  # token_kind 'all': the class token
    want = ms_quadratic(a_IN, e_ID)
    live = (a_IN > 0).any(0)
    np.testing.assert_allclose(c.tables.ms_N[live], want[live], rtol=1e-9)
    assert c.summary["reconstruction"]["n_rows"] == len(val) * T
    assert c.summary["probes"] == {"skipped": "no --probe-budgets given"}
    assert res.groups[0].summary["pooling"].startswith("per-image activation")


def test_ms_embeddings_joined_on_image_index(tmp_path):
    labels, x = make_data(n=60, seed=2)
    store = write_array_store(tmp_path / "a", {"emb": x}, labels, images_per_shard=16)
    # "another backbone" over the same images in another order, with one image missing
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(60, 5)).astype(np.float32)
    perm = rng.permutation(60)[:59]
    other = write_array_store(tmp_path / "b", {"clip": emb[perm]}, labels[perm], image_index=perm,
                              backbone_id="other", images_per_shard=16)
    assert other.fingerprint != store.fingerprint
    val = np.arange(60)
    ck = save_eval_checkpoint(tmp_path / "c.pt", store, "emb", signed(D), val)
    res = evaluate(EvalConfig([ck], ms_embeddings=str(tmp_path / "b"), k_sweep=(), probe_budgets=(),
                              progress=False))
    kept = np.sort(perm)
    model = signed(D).eval()
    with torch.no_grad():
        a = model.dense_code(*model.encode(torch.from_numpy(x[kept]))).numpy()
    want = ms_quadratic(a, emb[kept])
    live = (a > 0).any(0)
    np.testing.assert_allclose(res.checkpoints[0].tables.ms_N[live], want[live], rtol=1e-9)
    assert res.groups[0].summary["images_without_embedding"] == 1


def _split_stores(tmp_path, test_dataset="arrays"):
    """A 'train' and a 'test' store of the same (pretend) backbone: siblings, with different images."""
    def one(name, n, seed, dataset):
        labels, x = make_data(n=n, seed=seed)
        store = write_array_store(tmp_path / name, {"emb": x}, labels, images_per_shard=32, split=name,
                                  dataset_id=dataset, backbone_id="toy", backbone_fingerprint="sha256:toy")
        return store, x, labels
    train, _, _ = one("train", 200, 5, "arrays")
    test, x_test, y_test = one("test", 80, 6, test_dataset)
    assert train.fingerprint != test.fingerprint and train.layer_fingerprint("emb") == test.layer_fingerprint("emb")
    return train, test, x_test


def test_sibling_store_every_image_and_probes_from_the_training_store(tmp_path):
    train, test, x_test = _split_stores(tmp_path)
    ck = save_eval_checkpoint(tmp_path / "c.pt", train, "emb", signed(D), np.arange(150, 200))
    res = evaluate(EvalConfig([ck], store=str(test.path), k_sweep=(4,), probe_budgets=(1,), progress=False))
    summary, group = res.checkpoints[0].summary, res.groups[0].summary
    assert summary["reconstruction"]["n_rows"] == 80 and summary["reconstruction"]["fvu"] == 0.0
    xv = x_test.astype(np.float64)
    kept = np.zeros_like(xv)
    top = np.argsort(-np.abs(xv), axis=1)[:, :4]
    np.put_along_axis(kept, top, np.take_along_axis(xv, top, 1), 1)
    fvu = ((xv - kept) ** 2).sum() / ((xv - xv.mean(0)) ** 2).sum()
    assert summary["k_sweep"]["4"]["fvu"] == pytest.approx(fvu, rel=1e-6)
    # probes fit on the training store's 150 non-held-out images, scored on all 80 test images
    probes = summary["probes"]
    assert (probes["n_train"], probes["n_test"]) == (150, 80) and probes["budgets"]["1"]["accuracy"] == 1.0
    assert group["probe_train_store"] == str(train.path) and group["held_out_images"] == 80
    assert "every valid image" in group["evaluated_on"]


def test_sibling_store_without_its_training_store_skips_only_the_probes(tmp_path):
    train, test, _ = _split_stores(tmp_path, test_dataset="elsewhere")
    ck = save_eval_checkpoint(tmp_path / "c.pt", train, "emb", signed(D), np.arange(150, 200))
    res = evaluate(EvalConfig([ck], store=str(test.path), k_sweep=(), probe_budgets=(1,), progress=False))
    assert "labels do not match" in res.checkpoints[0].summary["probes"]["skipped"]
    shutil.rmtree(train.path)
    res = evaluate(EvalConfig([ck], store=str(test.path), k_sweep=(), probe_budgets=(1,), progress=False))
    assert "is not here" in res.checkpoints[0].summary["probes"]["skipped"]
    assert res.checkpoints[0].summary["reconstruction"]["n_rows"] == 80


def test_real_variants_sweep_matches_forward(tmp_path):
    labels, x = make_data(n=120, seed=4)
    store = write_array_store(tmp_path / "s", {"emb": x}, labels, images_per_shard=32)
    val = np.arange(60, 120)
    cks, models = [], []
    for arch in ("topk", "softk", "relu", "batchtopk"):
        torch.manual_seed(0)
        m = build_sae(resolve_config(arch, D, 32, 4))
        models.append(m.eval())
        cks.append(save_eval_checkpoint(tmp_path / arch / "ckpt.pt", store, "emb", m, val))
    res = evaluate(EvalConfig(cks, k_sweep=(2, 4), probe_budgets=(1, 4), batch_rows=32, progress=False))
    xv = torch.from_numpy(x[60:120])
    for ck, m in zip(res.checkpoints, models):
        with torch.no_grad():
            for k in (2, 4):
                xh = m(xv, k=k).x_hat_BD.double()
                fvu = ((xv.double() - xh) ** 2).sum() / ((xv.double() - xv.double().mean(0)) ** 2).sum()
                assert ck.summary["k_sweep"][str(k)]["fvu"] == pytest.approx(fvu.item(), rel=1e-6), ck.name
            xh = m(xv).x_hat_BD.double()
            fvu = ((xv.double() - xh) ** 2).sum() / ((xv.double() - xv.double().mean(0)) ** 2).sum()
            assert ck.summary["reconstruction"]["fvu"] == pytest.approx(fvu.item(), rel=1e-6), ck.name
    by_name = {c.name: c.summary for c in res.checkpoints}
    assert by_name["topk"]["k_sweep"]["4"]["fvu"] == by_name["topk"]["reconstruction"]["fvu"]
    assert "k_distribution" in by_name["softk"]["sparsity"]
    assert "k_distribution" not in by_name["topk"]["sparsity"]


def test_cli_writes_report(digits_run, tmp_path):
    _, _, _, _, cfg, _ = digits_run
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, [cfg.checkpoints[0], "--out", str(out), "--k-sweep", "4,8",
                                       "--probe-budgets", "1", "--max-images", "50", "--quiet"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "report.json").read_text())
    assert doc["groups"][0]["held_out_images"] == 50 and doc["groups"][0]["probe_train_images"] == 50
    assert sorted(doc["checkpoints"][0]["k_sweep"]) == ["4", "8"]


@pytest.mark.gpu
def test_cuda_matches_cpu(digits_run):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the cuda path is checked only on a GPU machine")
    _, _, _, _, cfg, res = digits_run
    gpu = evaluate(EvalConfig(cfg.checkpoints, device="cuda", k_sweep=cfg.k_sweep, probe_budgets=cfg.probe_budgets,
                              batch_rows=cfg.batch_rows, top_images=cfg.top_images, progress=False))
    for a, b in zip(res.checkpoints, gpu.checkpoints):
        assert b.summary["reconstruction"]["fvu"] == pytest.approx(a.summary["reconstruction"]["fvu"], abs=1e-6)
        np.testing.assert_allclose(b.tables.ms_N, a.tables.ms_N, rtol=1e-6)
