"""The latent explorer: its data checked against direct computations, and the page driven in Chromium.

The stores hold scikit-learn's digits (so thumbnails are real images): a token layer whose 4 patch
tokens are the image's 4x4 quadrants (so a heatmap must light the quadrant that holds the ink), and a
pooled layer with a linear "classifier head" fitted to the labels.
"""

import base64
import dataclasses
import gc
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from visionsae.evaluate import EvalConfig, run
from visionsae.evaluate.explorer import compute
from conftest import save_eval_checkpoint
from visionsae.sae import SAEConfig, build_sae
from visionsae.store import open_store, write_array_store
from visionsae.store.extras import head_attrs, read_head, write_head

N_IMG, N_LAT = 240, 48


def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images[:N_IMG].astype(np.float32) / 16.0, d.target[:N_IMG]




def _topk(d, seed, k=4):
    torch.manual_seed(seed)
    return build_sae(SAEConfig(arch="topk", d_in=d, n_latents=N_LAT, k=k)).eval()


@pytest.fixture(scope="module")
def explorer_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explorer")
    img, labels = _digits()
    quads = np.stack([img[:, :4, :4], img[:, :4, 4:], img[:, 4:, :4], img[:, 4:, 4:]], 1).reshape(N_IMG, 4, 16)
    tokens = np.concatenate([quads.mean(1, keepdims=True), quads], 1).reshape(-1, 16)  # class token, 2x2 grid
    tok = write_array_store(tmp / "tok", {"block": tokens}, labels, tokens_per_image=5, images_per_shard=64,
                            dataset_id="digits", classes=[f"digit {c}" for c in range(10)])
    pooled = img.reshape(N_IMG, 4, 2, 4, 2).mean((2, 4)).reshape(N_IMG, 16)
    emb = write_array_store(tmp / "emb", {"embedding": pooled}, labels, images_per_shard=64, dataset_id="digits")
    x1 = np.c_[pooled, np.ones(N_IMG)]
    w = np.linalg.lstsq(x1, np.eye(10)[labels], rcond=None)[0].T.astype(np.float32)
    write_head(emb.path, w[:, :16], w[:, 16], head_attrs(w[:, :16], input_kind="embedding", source="lstsq",
                                                         classes=[f"class {c}" for c in range(10)]))
    val = np.arange(0, N_IMG, 2)
    a = _topk(16, 0)
    b = _topk(16, 1)
    with torch.no_grad():  # b: a's latents in another order, so matching must find the permutation
        perm = torch.randperm(N_LAT, generator=torch.Generator().manual_seed(3))
        for name, p in b.named_parameters():
            src = dict(a.named_parameters())[name]
            p.copy_(src[perm] if p.shape[0] == N_LAT else src)
    cks = [save_eval_checkpoint(tmp / "tok_a" / "ckpt.pt", tok, "block", a, val), save_eval_checkpoint(tmp / "tok_b" / "ckpt.pt", tok, "block", b, val),
           save_eval_checkpoint(tmp / "emb" / "ckpt.pt", emb, "embedding", _topk(16, 2), val)]
    cfg = EvalConfig(cks, out=str(tmp / "report"), k_sweep=(2,), probe_budgets=(), batch_rows=40, top_images=10,
                     html_images=6, progress=False)
    res = run(cfg)
    return tmp, cfg, res, perm.numpy(), (tok, emb), (a, b)


def _load_js(path: Path):
    """The JSON arguments of a data file ``VSAE.f(arg, arg, ...);``."""
    body = re.match(r"VSAE\.\w+\((.*)\);\s*$", path.read_text(), re.S).group(1)
    return json.loads("[" + body + "]")


def _chunk(out, ck, lat):
    chunk = _load_js(out / "explorer" / "data" / f"c{ck}" / f"l{lat // 64}.js")[2]
    return chunk[lat % 64]


def test_files_and_thumbnails_once_per_image(explorer_run):
    tmp, cfg, res, *_ = explorer_run
    out = Path(cfg.out)
    meta = _load_js(out / "explorer" / "data" / "meta.js")[0]
    assert [c["name"] for c in meta["checkpoints"]] == ["tok_a", "tok_b", "emb"]
    assert meta["groups"][0]["grid"] == [1, 2, 2] and meta["groups"][1]["grid"] is None
    assert meta["groups"][0]["classes"][3] == "digit 3" and meta["groups"][1]["classes"][3] == "3"
    assert meta["groups"][1]["head_classes"][0] == "class 0" and meta["groups"][0]["head_classes"] is None
    table = _load_js(out / "explorer" / "data" / "c0" / "table.js")[1]
    assert len(table["rate"]) == N_LAT and "up" not in table
    shown = set()
    for ck in range(3):
        for lat in range(N_LAT):
            rec = _chunk(out, ck, lat)
            shown |= {(meta["checkpoints"][ck]["group"], im[0]) for im in rec["top"]}
            shown |= {(meta["checkpoints"][ck]["group"], im[0]) for band in rec["bands"] for im in band[4]}
    files = {p.name for p in (out / "thumbs").glob("*.png")}
    assert files == {f"g{g}-{i}.png" for g, i in shown}


def test_latent_record_matches_the_tables(explorer_run):
    tmp, cfg, res, *_ = explorer_run
    out = Path(cfg.out)
    t = res.checkpoints[0].tables
    store = res.groups[0].store
    for lat in np.nonzero(t.firing_rate_N > 0)[0][:10]:
        rec = _chunk(out, 0, int(lat))
        n_fire = int(round(t.image_rate_N[lat] * 120))
        assert sum(rec["hist"][1:]) == n_fire  # the histogram counts every firing held-out image once
        assert rec["nsample"] == min(n_fire, 32)
        top = t.top_slots_NM[lat, :6][t.top_vals_NM[lat, :6] > 0]
        assert [im[0] for im in rec["top"]] == store.image_index[top].tolist()
        np.testing.assert_allclose([im[1] for im in rec["top"]], t.top_vals_NM[lat, :len(top)], rtol=1e-3)
        assert sum(n for _, n in rec["cls"]) <= rec["ncls"] == n_fire


def test_token_activations_equal_a_dense_encode(explorer_run):
    _, _, res, _, (tok, _), (a, _) = explorer_run
    slots = np.array([3, 3, 10, 57, 200])
    lats = np.array([0, 5, 7, 0, 47])
    pv = compute.pair_values(a, tok, "block", slots, lats, torch.device("cpu"), batch_rows=10)
    with torch.no_grad():
        x = torch.from_numpy(tok.read_slots("block", slots))
        dense = a.dense_code(*a.encode(x)).view(len(slots), 5, N_LAT)
    want = dense[np.arange(len(slots)), :, lats].numpy()
    np.testing.assert_array_equal(pv.tokens_PT, want)


def test_patch_grids():
    assert compute.patch_grid(5, "all") == (1, 2, 2) and compute.patch_grid(49, "spatial") == (0, 7, 7)
    assert compute.patch_grid(1, "embedding") is None and compute.patch_grid(6, "patches") is None


def test_heatmap_is_the_latents_patch_activations_on_its_top_scale(explorer_run):
    """The heat of a latent's top image: its patch-token activations (class token skipped), 255 at the
    latent's largest activation over the shown images (under max pooling, the top image's value)."""
    _, cfg, res, _, (tok, _), (a, _) = explorer_run
    t = res.checkpoints[0].tables
    checked = 0
    for lat in np.nonzero(t.top_vals_NM[:, 0] > 0)[0][:5]:
        rec = _chunk(Path(cfg.out), 0, int(lat))
        index = rec["top"][0][0]
        slot = int(np.nonzero(tok.image_index == index)[0][0])
        pv = compute.pair_values(a, tok, "block", np.array([slot]), np.array([lat]), torch.device("cpu"), batch_rows=10)
        want = np.clip(np.rint(255 * pv.tokens_PT[0, 1:] / t.top_vals_NM[lat, 0]), 0, 255).astype(np.uint8)
        got = np.frombuffer(base64.b64decode(rec["heat"][str(index)]), dtype=np.uint8)
        np.testing.assert_array_equal(got, want)
        checked += 1
    assert checked == 5


def test_head_effects_and_ablation_are_exact(explorer_run):
    _, cfg, res, _, (_, emb), _ = explorer_run
    out = Path(cfg.out)
    from visionsae.sae import load_checkpoint
    model, _ = load_checkpoint(res.checkpoints[2].path)
    head = read_head(emb.path)
    dirs = compute.decoder_directions(model, N_LAT, torch.device("cpu")).numpy()
    np.testing.assert_allclose(dirs, model.W_dec.detach().numpy(), rtol=1e-6, atol=1e-7)
    eff = dirs @ head.weight_CD.T
    t = res.checkpoints[2].tables
    lat = int(np.argmax(t.firing_rate_N))
    rec = _chunk(out, 2, lat)
    assert len(rec["up"]) == len(rec["down"]) == 5  # 10 classes: two lists of 5 that never share a class
    assert [c for c, _ in rec["up"]] == np.argsort(-eff[lat])[:5].tolist()
    assert [c for c, _ in rec["down"]] == np.argsort(eff[lat])[:5].tolist()
    np.testing.assert_allclose([w for _, w in rec["up"]], np.sort(eff[lat])[::-1][:5], rtol=1e-3)
    slot = int(t.top_slots_NM[lat, 0])
    x = emb.read_slots("embedding", [slot])[0].astype(np.float64)
    a_val = float(t.top_vals_NM[lat, 0])
    logits = head.weight_CD @ x + head.bias_C
    after = head.weight_CD @ (x - a_val * dirs[lat]) + head.bias_C
    idx, label, pred, logit, dlogit, new_pred = rec["abl"][0]
    assert idx == emb.image_index[slot] and pred == int(np.argmax(logits)) and new_pred == int(np.argmax(after))
    assert logit == pytest.approx(logits[pred], rel=1e-3) and dlogit == pytest.approx(after[pred] - logits[pred],
                                                                                    rel=1e-3, abs=1e-4)
    table = _load_js(out / "explorer" / "data" / "c2" / "table.js")[1]
    assert table["up"][lat] == rec["up"][0][0]


def test_matching_finds_a_permuted_copy(explorer_run):
    _, cfg, res, perm, *_ = explorer_run
    out = Path(cfg.out)
    for lat in (0, 17, 47):
        rec = _chunk(out, 1, lat)  # b's latent lat is a's latent perm[lat]
        j, cos, mutual = rec["m"]["0"]
        assert j == perm[lat] and cos == pytest.approx(1.0, abs=1e-3) and mutual
    assert "2" not in _chunk(out, 0, 0)["m"]  # another layer is never matched


def test_head_round_trip_and_hdf5(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    for fmt in ("zarr", "hdf5"):
        store = write_array_store(tmp_path / f"s-{fmt}", {"embedding": x}, format=fmt)
        assert store.head() is None
        path = store.path
        del store  # an open HDF5 store holds its file read-only; sae-extract writes the head after closing it
        gc.collect()
        w, b = np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2, 3], np.float32)
        write_head(path, w, b, head_attrs(w, input_kind="embedding", source="t", classes=["a", "b", "c"]))
        head = open_store(path).head()
        assert np.array_equal(head.weight_CD, w) and np.array_equal(head.bias_C, b) and head.classes == ["a", "b", "c"]
        open_store(path).verify()  # the optional part leaves the store's checksums intact


def test_timm_head_export_names_imagenet_classes():
    import timm
    from visionsae.extract.backbones import timm_head
    from visionsae.images import synset_names
    w, b, attrs = timm_head(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    assert w.shape == (1000, 1280) and b.shape == (1000,) and attrs["classes"][770] == "running shoe"
    assert attrs["class_ids"][0] == "n01440764"
    assert timm_head(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)) is None
    assert synset_names(["n01440764", "n04133789"]) == ["tench", "sandal"]
    assert synset_names(["cats", "dogs"]) is None


# --- the page in a real browser --------------------------------------------------------------------
def _driver(tmp_path):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("no chromium + chromium-driver installed (apt-get install chromium chromium-driver): "
                    "the explorer is checked only as files")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1000",
                f"--user-data-dir={tmp_path / 'profile'}"):  # default file:// rules, as a user has
        opts.add_argument(arg)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=opts, service=service)


def _wait(driver, js, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(js))


def test_explorer_in_chromium(explorer_run, tmp_path):
    _, cfg, res, *_ = explorer_run
    shots = Path(cfg.out).parent / "screenshots"
    shots.mkdir(exist_ok=True)
    driver = _driver(tmp_path)
    try:
        driver.get((Path(cfg.out) / "index.html").resolve().as_uri())
        _wait(driver, "return document.querySelectorAll('#rows .row').length > 0")
        n_live = int((res.checkpoints[0].tables.firing_rate_N > 0).sum())
        assert driver.execute_script("return document.querySelector('#count').textContent") == f"{N_LAT} of {N_LAT} latents"
        # every MS figure names the encoder of its image embeddings (here the evaluated layer itself)
        encoder = res.groups[0].summary["ms_encoder"]
        assert f"(e_n: {encoder})" in driver.execute_script("return document.querySelector('#cksum').textContent")
        # sort by max activation (descending), then ascending: the first row follows the table
        driver.find_element("css selector", "#thead span[data-k='max']").click()
        first = int(driver.execute_script("return document.querySelector('#rows .row').dataset.l"))
        assert first == int(np.argmax(res.checkpoints[0].tables.top_vals_NM[:, 0]))
        # a range filter keeps exactly the latents in range (on the table's own, rounded, values)
        ms = _load_js(Path(cfg.out) / "explorer" / "data" / "c0" / "table.js")[1]["ms"]
        driver.execute_script("const i = document.querySelector(\"input[data-min='ms']\"); i.value = '0.85'; i.oninput();")
        want = sum(v is not None and v >= 0.85 for v in ms)
        assert driver.execute_script("return document.querySelector('#count').textContent") == f"{want} of {N_LAT} latents"
        driver.execute_script("const i = document.querySelector(\"input[data-min='ms']\"); i.value = ''; i.oninput();")
        # a latent number and Enter open that latent
        box = driver.find_element("css selector", "#q")
        box.send_keys("5\n")
        _wait(driver, "return location.hash.endsWith('l=5') && document.querySelector('#detail .latent') !== null")
        box.clear()
        driver.execute_script("document.querySelector('#q').oninput()")
        # hide dead latents, search a class name
        driver.execute_script("const b = document.querySelector('#dead'); b.checked = false; b.onchange();")
        assert driver.execute_script("return document.querySelector('#count').textContent").startswith(f"{n_live} of")
        box = driver.find_element("css selector", "#q")
        box.send_keys("digit 3")
        names = driver.execute_script("return [...document.querySelectorAll('#rows .row .name')].map(e => e.textContent)")
        assert names and set(names) == {"digit 3"}
        driver.save_screenshot(str(shots / "table-search.png"))
        driver.find_element("css selector", "#rows .row").click()
        _wait(driver, "return document.querySelector('#detail .latent') !== null")
        _wait(driver, "return [...document.images].every(i => i.complete)")
        drawn = driver.execute_script("""
            const ink = c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                               let s = 0; for (let i = 3; i < d.length; i += 4) s += d[i]; return s; };
            return {hist: ink(document.querySelector('canvas.hist')),
                    heats: [...document.querySelectorAll('canvas.heat')].map(ink),
                    imgs: [...document.querySelectorAll('#detail img')].filter(i => i.naturalWidth > 0).length};""")
        assert drawn["hist"] > 0 and drawn["heats"] and all(v > 0 for v in drawn["heats"]) and drawn["imgs"] > 0
        driver.save_screenshot(str(shots / "latent-token-layer.png"))
        # the down arrow opens the next latent of the filtered table
        rows = driver.execute_script("return [...document.querySelectorAll('#rows .row')].map(r => +r.dataset.l)")
        driver.find_element("css selector", "body").send_keys("\ue015")  # Keys.ARROW_DOWN
        _wait(driver, f"return location.hash.endsWith('l={rows[1]}')")
        # heatmaps toggle off
        driver.find_element("css selector", ".heatbox").click()
        assert driver.execute_script("return getComputedStyle(document.querySelector('canvas.heat')).display") == "none"
        # side by side with the matched latent of the other checkpoint
        driver.find_element("css selector", "a.vs").click()
        _wait(driver, "return document.querySelectorAll('.compare .latent').length === 2")
        driver.save_screenshot(str(shots / "compare.png"))
        # the pooled layer with a head: promoted classes and the ablation table
        lat = int(np.argmax(res.checkpoints[2].tables.firing_rate_N))
        driver.get((Path(cfg.out) / "index.html").resolve().as_uri() + f"#c=2&l={lat}")
        _wait(driver, "return document.querySelector('table.abl') !== null")
        assert driver.execute_script("return document.querySelectorAll('.fx li').length") == 10
        driver.save_screenshot(str(shots / "latent-head.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def test_vectorised_rounding_equals_four_significant_digits():
    from visionsae.evaluate.explorer.write import _col, _g
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.lognormal(0, 6, 2000) * rng.choice([-1, 1], 2000), [0.0, np.nan, np.inf, 999.96, 0.3]])
    assert _col(x) == [_g(v) for v in x]


def test_class_token_pooling_shows_the_values_images_were_ranked_by(explorer_run, tmp_path):
    """--image-pooling cls ranks a latent's images by its class-token activation: the page shows those values."""
    tmp, cfg, *_ = explorer_run
    cls_cfg = dataclasses.replace(cfg, checkpoints=cfg.checkpoints[:1], out=str(tmp_path / "cls"), image_pooling="cls")
    t = run(cls_cfg).checkpoints[0].tables
    for lat in np.nonzero(t.top_vals_NM[:, 0] > 0)[0][:5]:
        shown = [v for _, v, _ in _chunk(Path(cls_cfg.out), 0, int(lat))["top"]]
        np.testing.assert_allclose(shown, t.top_vals_NM[lat, :len(shown)], rtol=1e-3)


def test_quantised_heatmaps_are_within_one_level_of_the_exact_ones(explorer_run):
    """The explorer keeps token activations as uint8 levels per (latent, image) pair (1 byte per token, not 4):
    every heatmap is within one level of rint(255 a / the latent's largest shown activation), and exact on the
    image that holds that largest activation."""
    _, cfg, res, _, (tok, _), (a, _) = explorer_run
    t = res.checkpoints[0].tables
    n_heat = n_exact = 0
    for lat in np.nonzero(t.top_vals_NM[:, 0] > 0)[0][:12]:
        rec = _chunk(Path(cfg.out), 0, int(lat))
        heats = rec.get("heat", {})
        index = np.array([int(i) for i in heats])
        slots = np.array([int(np.nonzero(tok.image_index == i)[0][0]) for i in index])
        pv = compute.pair_values(a, tok, "block", slots, np.full(len(slots), lat), torch.device("cpu"), batch_rows=10)
        q = compute.pair_values(a, tok, "block", slots, np.full(len(slots), lat), torch.device("cpu"), batch_rows=10,
                                quantised=True)
        np.testing.assert_array_equal(q.max_P, pv.tokens_PT.max(1))
        np.testing.assert_array_equal(q.first_P, pv.tokens_PT[:, 0])
        # under max pooling the top image holds the latent's largest activation, and every top image has a heatmap
        scale = pv.tokens_PT.max()
        for p, i in enumerate(index):
            got = np.frombuffer(base64.b64decode(heats[str(i)]), dtype=np.uint8).astype(int)
            want = np.clip(np.rint(255 * pv.tokens_PT[p, 1:] / np.float64(scale)), 0, 255)
            assert np.abs(got - want).max() <= 1
            if pv.tokens_PT[p].max() == scale:
                np.testing.assert_array_equal(got, want)
                n_exact += 1
            n_heat += 1
    assert n_heat > 12 and n_exact >= 1
