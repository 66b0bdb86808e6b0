"""sae-eval at scale: what it holds is bounded by latents, batch and settings, not by the rows evaluated.

The acceptance test runs ``evaluate`` (what sae-eval runs) on N and on 8N held-out images of one store and
measures the peak of traced memory (tracemalloc sees every numpy allocation; torch's accumulators are fixed
tables of the latents): it must not grow with the rows. The parts that used to keep a value per row or per
image (SoftSAE's k values, the raw probe's image vectors, the held-out images' top codes) have their own
tests here against the in-memory definitions they replace.
"""

import math
import tracemalloc
import weakref

import numpy as np
import pytest
import torch

from conftest import save_eval_checkpoint
from visionsae.errors import UserError
from visionsae.evaluate import EvalConfig, evaluate
from visionsae.evaluate import config as eval_config
from visionsae.evaluate.codes import ImageCodes
from visionsae.evaluate.latent_stats import N_BINS
from visionsae.evaluate.metrics import K_BINS_PER_UNIT, KDistribution, k_distribution
from visionsae.evaluate.probes import TopCodes, fit, run_probes, StreamedScore
from visionsae.sae import build_sae
from visionsae.sae.registry import resolve_config
from visionsae.store import Store, write_array_store

T, D, N_LAT, N_CLASSES = 32, 64, 64, 4
N_SMALL, GROWTH = 96, 8


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """One token store; checkpoints (Top-k and SoftSAE) holding out its first N and its first 8N images."""
    tmp = tmp_path_factory.mktemp("evalmem")
    n_img = GROWTH * N_SMALL + 200  # the last 200 images train the probes in both runs
    rng = np.random.default_rng(0)
    labels = rng.integers(0, N_CLASSES, n_img)
    x = rng.normal(size=(n_img * T, D)).astype(np.float32)
    x[np.arange(n_img * T), np.repeat(labels, T)] += 4.0
    store = write_array_store(tmp / "store", {"tok": x}, labels, tokens_per_image=T, images_per_shard=128,
                              classes=[f"c{c}" for c in range(N_CLASSES)])
    runs = {}
    for n in (N_SMALL, GROWTH * N_SMALL):
        cks = []
        for arch in ("topk", "softk"):
            torch.manual_seed(1)
            model = build_sae(resolve_config(arch, D, N_LAT, 4))
            cks.append(save_eval_checkpoint(tmp / f"{arch}-{n}" / "ckpt.pt", store, "tok", model, np.arange(n)))
        runs[n] = cks
    return store, runs


def _peak_traced(cfg: EvalConfig):
    evaluate(cfg)  # warm-up: first-call allocations of numpy, scipy and scikit-learn are not the rows'
    tracemalloc.start()
    try:
        result = evaluate(cfg)
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_eval_memory_does_not_grow_with_the_rows(grown):
    """8x the held-out rows: the traced peak grows by far less than one float per added row.

    Before this change the run kept, per row, SoftSAE's k (8 bytes, 256 per image here) and, per image, the
    raw probe's vector (4 D = 256 bytes) and the top codes (12 bytes x budget): at least 512 bytes per added
    image. What may remain is the per-image bookkeeping (slot, label: tens of bytes per image)."""
    store, runs = grown
    peaks = {}
    for n, cks in runs.items():
        cfg = EvalConfig(cks, k_sweep=(2,), probe_budgets=(1, 4), probe_train_images=200, batch_rows=8 * T,
                         top_images=8, device="cpu", progress=False)
        peaks[n], result = _peak_traced(cfg)
        assert result.groups[0].summary["held_out_rows"] == n * T
        assert "k_distribution" in result.checkpoints[1].summary["sparsity"]
        assert result.checkpoints[0].summary["probes"]["n_test"] == n
    added_images = (GROWTH - 1) * N_SMALL
    row_bytes = added_images * T * D * 4
    growth = peaks[GROWTH * N_SMALL] - peaks[N_SMALL]
    print(f"traced peaks {peaks}, growth {growth / added_images:.1f} bytes per added image")
    assert growth < 64 * added_images, (peaks, growth / added_images)
    assert growth < 0.01 * row_bytes


def test_no_batch_of_rows_outlives_its_batch(grown, monkeypatch):
    """Every block of rows sae-eval reads is released before the next is read, in the probe-training pass and
    the held-out pass alike. (tracemalloc does not see torch's allocations, so the test above cannot see a
    tensor view that pins its batch: the raw probe kept the class token of each probe-training batch as a
    view, holding all T rows of every batch until the probe was fitted.)"""
    store, runs = grown
    alive: list[weakref.ref] = []
    most, reads = [0], [0]
    read_slots = Store.read_slots

    def spy(self, layer, slots):
        out = read_slots(self, layer, slots)
        alive[:] = [ref for ref in alive if ref() is not None]
        most[0], reads[0] = max(most[0], len(alive)), reads[0] + 1
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(Store, "read_slots", spy)
    cfg = EvalConfig(runs[GROWTH * N_SMALL], k_sweep=(2,), probe_budgets=(1, 4), probe_train_images=200,
                     batch_rows=8 * T, top_images=8, device="cpu", progress=False)
    evaluate(cfg)
    assert reads[0] > 100  # both passes read many batches
    assert most[0] <= 1  # at most the batch in use while the next is read


def test_k_distribution_streamed_equals_the_definition():
    rng = np.random.default_rng(3)
    k = np.concatenate([rng.uniform(1.0, 9.0, 5000), [3.0, 3.0, 12.75]]).astype(np.float32).astype(np.float64)
    acc = KDistribution()
    for part in np.array_split(k, 7):  # batches that widen the range as they come
        acc.update(part)
    got, want = acc.result(), k_distribution(k)
    for key in ("mean", "std", "min", "max"):
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    assert got["hist_edges"] == want["hist_edges"] and got["hist_counts"] == want["hist_counts"]
    for key in ("q05", "q25", "median", "q75", "q95"):
        assert abs(got[key] - want[key]) <= 0.5 / K_BINS_PER_UNIT, key
    assert got["quantile_bin"] == 1 / K_BINS_PER_UNIT
    # memory: the bins span k's range, not the number of values
    assert acc.counts_F.size == (12 + 1 - 1) * K_BINS_PER_UNIT


def test_streamed_probe_scores_equal_the_in_memory_ones(tmp_path):
    rng = np.random.default_rng(4)
    n_lat, y_tr, y_te = 30, rng.integers(0, 3, 300), rng.integers(-1, 3, 500)  # -1: unlabelled, left out
    a_tr = rng.exponential(size=(300, n_lat)) * (rng.random((300, n_lat)) < 0.3)
    a_te = rng.exponential(size=(500, n_lat)) * (rng.random((500, n_lat)) < 0.3)
    a_tr[np.arange(300), y_tr] += 2.0
    a_te[np.arange(500), np.maximum(y_te, 0)] += 2.0
    train, mem, spilled = TopCodes(4), TopCodes(4), TopCodes(4, tmp_path / "spill")
    train.update(ImageCodes.from_dense(torch.from_numpy(a_tr).float()))
    for lo in range(0, 500, 64):
        codes = ImageCodes.from_dense(torch.from_numpy(a_te[lo:lo + 64]).float())
        mem.update(codes)
        spilled.update(codes)
    (mv, mi), (sv, si) = mem.result(), spilled.result()
    assert isinstance(sv, np.memmap) and sv.shape == (500, 4)
    np.testing.assert_array_equal(mv, sv)
    np.testing.assert_array_equal(mi, si)
    labelled = y_te >= 0
    want = run_probes(train.result(), y_tr, (mv[labelled], mi[labelled]), y_te[labelled], [1, 4], n_lat, 0)
    import visionsae.evaluate.probes as probes
    small = probes.SCORE_BLOCK
    try:
        probes.SCORE_BLOCK = 37  # many blocks, the last one short
        got = run_probes(train.result(), y_tr, spilled.result(), y_te, [1, 4], n_lat, 0)
    finally:
        probes.SCORE_BLOCK = small
    assert got == want and want[4]["accuracy"] > 0.5
    spilled.close()
    # a dense probe scored batch by batch: probe.score on everything at once
    probe, converged = fit(a_tr, y_tr, 0)
    score = StreamedScore(probe, converged)
    for lo in range(0, 500, 64):
        score.update(a_te[lo:lo + 64], y_te[lo:lo + 64])
    assert score.result()["accuracy"] == float(probe.score(a_te[labelled], y_te[labelled]))


def test_memory_constants_are_the_tables():
    from visionsae.evaluate import latent_stats
    assert eval_config._HIST_BINS == N_BINS
    assert eval_config._K_BIN_BYTES == 8 * K_BINS_PER_UNIT
    assert latent_stats.LatentStatsAccumulator(4).sample.top_m == eval_config._SAMPLE


def _shape(n=16384, n_ck=1, classes=1000):
    return eval_config.GroupShape([n] * n_ck, [False] * n_ck, d=768, tokens=197, n_classes=classes, d_embed=768,
                                  probe_train=10_000)


def test_memory_estimate_is_independent_of_rows_and_grows_with_what_it_holds():
    cfg = EvalConfig(["x"])
    one = eval_config.eval_memory(cfg, [_shape()])
    assert one["batch"] >= 4096 // 197 * 197 * 16384 * 4  # at least the batch's dense pre-activations
    assert one["accumulators"] >= 16384 * 1000 * 8  # the class counts
    many = eval_config.eval_memory(cfg, [_shape(n_ck=12)])
    assert many["accumulators"] == 12 * one["accumulators"] and many["batch"] == one["batch"]
    wide = eval_config.eval_memory(EvalConfig(["x"], top_images=500), [_shape()])
    assert wide["tables"] > one["tables"] and wide["accumulators"] > one["accumulators"]


def test_refuses_in_one_line_what_cannot_fit():
    cfg = EvalConfig(["x"], batch_rows=10 ** 7)
    with pytest.raises(UserError) as err:
        eval_config.check_memory(cfg, [_shape()], 64 * 2**30, "this machine's memory")
    text = str(err.value)
    assert "\n" not in text and "need about" in text and "batch" in text and "lower --batch-rows" in text
    # the default settings of an ImageNet-sized evaluation fit a 64 GiB machine, and a 40 GiB GPU with its host
    eval_config.check_memory(EvalConfig(["x"]), [_shape()], 64 * 2**30, "this machine's memory")
    eval_config.check_memory(EvalConfig(["x"]), [_shape()], 40 * 2**30, "the GPU", 64 * 2**30)
    with pytest.raises(UserError, match="evaluate fewer checkpoints at once"):
        eval_config.check_memory(EvalConfig(["x"]), [_shape(n_ck=200)], 40 * 2**30, "the GPU", 2**40)
    with pytest.raises(UserError, match=r"this machine's memory has 2\.0 GiB.*probe_fit"):
        eval_config.check_memory(EvalConfig(["x"]), [_shape()], 40 * 2**30, "the GPU", 2 * 2**30)
    assert math.isfinite(eval_config.peak_memory(eval_config.eval_memory(cfg, [_shape()]), False)[0])


def test_ms_embeddings_are_read_a_batch_of_rows_at_a_time(grown, tmp_path):
    """--ms-embeddings may hold many tokens per image: its vectors are read max_rows rows at a time, the same."""
    from visionsae.evaluate.embeddings import OtherEmbeddings
    store, _ = grown
    n = store.n_images
    rng = np.random.default_rng(6)
    other = write_array_store(tmp_path / "other", {"tok": rng.normal(size=(n * 5, 12)).astype(np.float32)},
                              store.labels, tokens_per_image=5, images_per_shard=100,
                              classes=[f"c{c}" for c in range(N_CLASSES)])
    emb = OtherEmbeddings(str(other.path), None, store)
    slots = emb.slots_for(store.image_index[np.arange(3, 300, 7)])
    whole = emb.vectors(slots)
    assert whole.shape == (len(slots), 12)
    np.testing.assert_array_equal(emb.vectors(slots, max_rows=5 * 4), whole)
    np.testing.assert_array_equal(emb.vectors(slots, max_rows=1), whole)  # at least one whole image


def test_a_full_disk_for_the_spilled_codes_is_one_line(tmp_path):
    from conftest import mounted_tmpfs
    with mounted_tmpfs(tmp_path / "small", "64k") as small:
        codes = TopCodes(8, small / "c0")
        acts = torch.rand(1024, 8)
        with pytest.raises(UserError) as err:
            for _ in range(64):  # 64 KB each
                codes.update_rows(acts, torch.arange(8).expand(1024, 8))
        assert "\n" not in str(err.value) and "TMPDIR" in str(err.value) and "64 bytes per image" in str(err.value)
        codes.close()
