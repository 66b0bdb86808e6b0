"""The latent explorer at scale: a 16,384-latent checkpoint over 10,000 images.

Synthetic codes over real images: the store holds 10,000 Fashion-MNIST test images (so thumbnails are
real; dataset id ``fashion-mnist``, split ``val``) whose "activations" are sparse sums of 16,384 random
unit directions with Zipf-distributed frequencies, and the checkpoint is a Top-k SAE (k = 16) whose
encoder and decoder are those directions. A random ImageNet-sized classifier head (1000 classes, the
ImageNet names) makes the explorer compute class effects and ablations too.

Measured: the size on disk of what the explorer writes (index.html, explorer/, thumbs/); the time
sae-eval spends writing it, against the time of the metrics pass over the same data (``evaluate``); the
time until the page is usable in headless Chromium (``performance`` marks the page sets: the table
rendered; a latent page drawn after a click), against a blank page's load in the same browser.

    .venv/bin/python bench/explorer.py [--images 10000] [--latents 16384] [--d 768] [--out /tmp/bench-explorer]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from visionsae.evaluate import EvalConfig, evaluate
from visionsae.evaluate.explorer import write_explorer
from visionsae.sae import SAEConfig, build_sae, save_checkpoint
from visionsae.store import write_array_store
from visionsae.store.extras import head_attrs, write_head

FMNIST = "/usr/share/datasets/fashion-mnist"


def make_inputs(out: Path, n_img: int, n_lat: int, d: int, k: int) -> str:
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((n_lat, d)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    freq = 1.0 / np.arange(1, n_lat + 1) ** 0.8  # Zipf-like: a few frequent latents, a long tail, some never
    freq /= freq.sum()
    x = np.zeros((n_img, d), dtype=np.float32)
    for i in range(n_img):
        lat = rng.choice(n_lat, size=k, replace=False, p=freq)
        x[i] = rng.gamma(2.0, 1.0, size=k).astype(np.float32) @ dirs[lat]
    labels = rng.integers(0, 10, n_img)  # synthetic codes: labels carry no meaning here
    store = write_array_store(out / "store", {"embedding": x}, labels, images_per_shard=1024,
                              dataset_id="fashion-mnist", split="val", overwrite=True,
                              classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                       "Sneaker", "Bag", "Ankle boot"])
    root_fix(out / "store")
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    w = (rng.standard_normal((1000, d)) / np.sqrt(d)).astype(np.float32)
    names = [info.index_to_description(c).split(",")[0] for c in range(1000)]
    path = store.path
    del store
    write_head(path, w, np.zeros(1000, np.float32), head_attrs(w, input_kind="embedding", source="random",
                                                              classes=names))
    from visionsae.store import open_store
    store = open_store(path)
    model = build_sae(SAEConfig(arch="topk", d_in=d, n_latents=n_lat, k=k))
    with torch.no_grad():
        model.W_dec.copy_(torch.from_numpy(dirs))
        model.W_enc.copy_(torch.from_numpy(dirs))
        model.b_enc.zero_()
        model.b_dec.zero_()
    ckpt = out / "ckpt" / "ckpt.pt"
    save_checkpoint(ckpt, model, input_scale=1.0,
                    store={"path": str(path), "fingerprint": store.fingerprint, "layer_fingerprint": None,
                           "layer": "embedding", "d": d},
                    split={"val_slots": torch.arange(n_img), "val_fraction": 1.0, "seed": 0}, train={}, step=0,
                    metrics={})
    return str(ckpt)


def root_fix(store_dir: Path) -> None:
    """write_array_store records no dataset root: point it at the Debian package's files for thumbnails."""
    import json
    meta_file = store_dir / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["visionsae"]["dataset"]["root"] = FMNIST
    meta_file.write_text(json.dumps(meta, indent=2))


def du(paths: list[Path]) -> tuple[int, int]:
    size = files = 0
    for p in paths:
        for f in ([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                size += f.stat().st_size
                files += 1
    return size, files


def browser_times(page: Path, blank: Path, latent: int) -> dict[str, float]:
    from selenium import webdriver
    from selenium.webdriver.support.ui import WebDriverWait
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    try:
        driver.get(blank.as_uri())  # the first navigation also starts the browser's processes: not counted
        driver.get(blank.as_uri() + "?again")
        blank_ms = driver.execute_script("return performance.getEntriesByType('navigation')[0].loadEventEnd")
        driver.get(page.as_uri())
        WebDriverWait(driver, 120).until(lambda d: d.execute_script(
            "return performance.getEntriesByName('vsae-table-ready').length > 0"))
        ready_ms = driver.execute_script("return performance.getEntriesByName('vsae-table-ready')[0].startTime")
        sort_ms = driver.execute_script("""const t0 = performance.now();
            document.querySelector("#thead span[data-k='ms']").click(); return performance.now() - t0;""")
        search_ms = driver.execute_script("""const q = document.querySelector('#q'); q.value = 'shoe';
            const t0 = performance.now(); q.oninput(); return performance.now() - t0;""")
        t0 = driver.execute_script("return performance.now()")
        driver.execute_script(f"location.hash = 'c=0&l={latent}'")
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return performance.getEntriesByName('vsae-latent-ready').length > 0"))
        latent_ms = driver.execute_script("return performance.getEntriesByName('vsae-latent-ready')[0].startTime") - t0
        return {"blank_ms": blank_ms, "ready_ms": ready_ms, "sort_ms": sort_ms, "search_ms": search_ms,
                "latent_ms": latent_ms}
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--latents", type=int, default=16_384)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--out", default="/tmp/bench-explorer")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ckpt = make_inputs(out, args.images, args.latents, args.d, args.k)
    print(f"inputs: {time.perf_counter() - t:.1f} s")
    report = out / "report"
    shutil.rmtree(report, ignore_errors=True)
    report.mkdir(parents=True)
    cfg = EvalConfig([ckpt], out=str(report), k_sweep=(), probe_budgets=(), device="cpu", progress=False)
    t = time.perf_counter()
    result = evaluate(cfg)
    eval_s = time.perf_counter() - t
    t = time.perf_counter()
    page = write_explorer(result, report, {})
    write_s = time.perf_counter() - t
    size, files = du([page, report / "explorer", report / "thumbs"])
    data_size, _ = du([report / "explorer" / "data"])
    thumbs_size, n_thumbs = du([report / "thumbs"])
    blank = out / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body>blank</body></html>")
    live = result.checkpoints[0].tables.firing_rate_N > 0
    latent = int(np.nonzero(live)[0][len(np.nonzero(live)[0]) // 2])
    times = browser_times(page.resolve(), blank.resolve(), latent) if shutil.which("chromium") else {}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"checkpoint: {args.latents} latents (d = {args.d}, k = {args.k}), {args.images} images, "
          f"{int(live.sum())} live")
    print(f"size on disk: {size / 2**20:.1f} MiB in {files} files (data {data_size / 2**20:.1f} MiB, "
          f"{n_thumbs} thumbnails {thumbs_size / 2**20:.1f} MiB)")
    print(f"sae-eval metrics pass: {eval_s:.1f} s; writing the explorer: {write_s:.1f} s "
          f"({write_s / eval_s:.2f}x the metrics pass)")
    if times:
        print(f"headless Chromium: table usable {times['ready_ms']:.0f} ms after navigation start "
              f"(blank page load {times['blank_ms']:.0f} ms, {times['ready_ms'] / max(times['blank_ms'], 1):.1f}x); "
              f"sort {args.latents} rows by MS {times['sort_ms']:.0f} ms; search 'shoe' {times['search_ms']:.0f} ms; "
              f"open a latent {times['latent_ms']:.0f} ms")
    else:
        print("no chromium: page timings not measured")


if __name__ == "__main__":
    main()
