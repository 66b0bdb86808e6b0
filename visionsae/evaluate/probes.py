"""Small-budget linear probing: classify images from only their m largest latents.

Each image keeps the m largest entries of its (per-image pooled) code; a multinomial logistic
regression is fit on training-split images and scored on the held-out ones. The same probe on the
raw image-level activations is the reference line.

Memory does not grow with the held-out images: a fitted probe is scored block by block (the count of
correct predictions, so the accuracy is the one ``probe.score`` gives on all of them at once), and the
held-out images' top codes can be spilled to a file (``TopCodes(m, spill=...)``), read back as a memmap.

Shape suffixes: I images, M kept latents per image (the largest budget), N latents, D width.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import MaxAbsScaler, StandardScaler

from visionsae.errors import UserError
from visionsae.evaluate.codes import ImageCodes, top_per_group

# lbfgs iterations: enough for the probes here to converge; a probe that still has not is reported.
MAX_ITER = 1000
# Held-out images scored at once (their sparse features: SCORE_BLOCK x m entries).
SCORE_BLOCK = 16384


class TopCodes:
    """Per image, the values and indices of its ``m`` largest latents, collected batch by batch.

    Images with fewer than m firing latents are padded with value 0 and index -1. With ``spill`` (a folder)
    they are appended to two files there (float32 values, int32 indices: 8 bytes per entry) instead of
    memory, and ``result()`` maps them back read-only.
    """

    def __init__(self, m: int, spill: Path | None = None):
        self.m = m
        self.vals: list[np.ndarray] = []
        self.idx: list[np.ndarray] = []
        self.n = 0
        self.spill = Path(spill) if spill is not None else None
        self._files = None
        if self.spill is not None:
            self.spill.mkdir(parents=True, exist_ok=True)
            self._files = (open(self.spill / "vals.f32", "wb"), open(self.spill / "idx.i32", "wb"))

    @torch.no_grad()
    def update(self, codes: ImageCodes) -> None:
        """From per-image (pooled) codes."""
        vals_IM, idx_IM = top_per_group(codes.img_P, codes.val_P, codes.lat_P, codes.n_images, self.m)
        self._add(vals_IM, idx_IM)

    @torch.no_grad()
    def update_rows(self, acts_IK: torch.Tensor, idx_IK: torch.Tensor) -> None:
        """From an SAE's kept code with one row per image (cheaper: a top-m over K, not a sort)."""
        m = min(self.m, acts_IK.shape[1])
        vals_IM, pos_IM = acts_IK.topk(m, dim=1)
        idx_IM = torch.where(vals_IM > 0, idx_IK.gather(1, pos_IM), -1)
        vals_IM = vals_IM.clamp_min(0)
        if m < self.m:
            vals_IM = torch.nn.functional.pad(vals_IM, (0, self.m - m))
            idx_IM = torch.nn.functional.pad(idx_IM, (0, self.m - m), value=-1)
        self._add(vals_IM, idx_IM)

    def _add(self, vals_IM: torch.Tensor, idx_IM: torch.Tensor) -> None:
        vals, idx = vals_IM.to("cpu", torch.float32).numpy(), idx_IM.cpu().numpy()
        self.n += vals.shape[0]
        if self._files is None:
            self.vals.append(vals)
            self.idx.append(idx)
            return
        try:
            vals.tofile(self._files[0])
            idx.astype(np.int32).tofile(self._files[1])
        except OSError as err:
            raise UserError(f"cannot write the held-out images' codes for the probes to {self.spill} "
                            f"({err.strerror or err}; {8 * self.m} bytes per image and checkpoint): free space "
                            "there or point TMPDIR to a folder with room") from None

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self._files is None:
            return np.concatenate(self.vals), np.concatenate(self.idx)
        for f in self._files:
            f.flush()
        if self.n == 0:
            return np.zeros((0, self.m), np.float32), np.zeros((0, self.m), np.int32)
        return (np.memmap(self.spill / "vals.f32", np.float32, "r", shape=(self.n, self.m)),
                np.memmap(self.spill / "idx.i32", np.int32, "r", shape=(self.n, self.m)))

    def close(self) -> None:
        for f in self._files or ():
            f.close()


def budget_matrix(vals_IM: np.ndarray, idx_IM: np.ndarray, m: int, n_latents: int) -> sp.csr_matrix:
    """Sparse [I, N] features keeping each image's m largest latents (zeros dropped)."""
    n_img = vals_IM.shape[0]
    vals, idx = vals_IM[:, :m], idx_IM[:, :m]
    rows = np.repeat(np.arange(n_img), vals.shape[1]).reshape(vals.shape)
    use = vals != 0  # zeros are padding (an image with fewer than m firing latents)
    return sp.csr_matrix((vals[use].astype(np.float64), (rows[use], idx[use])), shape=(n_img, n_latents))


def fit_score(x_train, y_train: np.ndarray, x_test, y_test: np.ndarray, seed: int) -> dict:
    """Accuracy of a logistic-regression probe; sparse inputs are scaled by max-abs, dense by z-score."""
    score = StreamedScore(*fit(x_train, y_train, seed))
    score.update(x_test, y_test)
    return score.result()


def fit(x_train, y_train: np.ndarray, seed: int) -> tuple[Pipeline, bool]:
    """(fitted probe, whether lbfgs converged)."""
    scaler = MaxAbsScaler() if sp.issparse(x_train) else StandardScaler()
    probe = make_pipeline(scaler, LogisticRegression(max_iter=MAX_ITER, random_state=seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(x_train, y_train)
    return probe, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


class StreamedScore:
    """A fitted probe's accuracy over test images given block by block (images labelled -1 are left out):
    the same figure as ``probe.score`` on all of them, with memory of one block."""

    def __init__(self, probe: Pipeline, converged: bool):
        self.probe, self.converged = probe, converged
        self.correct = self.n = 0

    def update(self, x, y: np.ndarray) -> None:
        use = np.asarray(y) >= 0
        if use.all():
            self.correct += int((self.probe.predict(x) == y).sum())
        elif use.any():
            self.correct += int((self.probe.predict(x[use]) == y[use]).sum())
        self.n += int(use.sum())

    def result(self) -> dict:
        return {"accuracy": self.correct / self.n if self.n else float("nan"), "converged": self.converged}


def check_labels(y_train: np.ndarray, y_test: np.ndarray) -> str | None:
    """Why probing is impossible on these labels, or None when it can run."""
    if len(y_test) == 0:
        return "no labelled held-out images"
    if len(np.unique(y_train)) < 2:
        return f"the probe-training images have {len(np.unique(y_train))} class(es); at least 2 are needed"
    return None


def run_probes(train_codes: tuple[np.ndarray, np.ndarray], y_train: np.ndarray,
               test_codes: tuple[np.ndarray, np.ndarray], y_test: np.ndarray,
               budgets: list[int], n_latents: int, seed: int) -> dict[int, dict]:
    """{m: {"accuracy", "converged"}} for each budget m. Test images labelled -1 are left out; the test codes
    (which may be memmaps) are read SCORE_BLOCK images at a time."""
    out = {}
    vals_IM, idx_IM = test_codes
    for m in budgets:
        x_train = budget_matrix(*train_codes, m, n_latents)
        # Only latents some training image keeps can get a weight (an all-zero column's weight is 0 at the
        # optimum of the l2-penalised loss), so dropping the others changes no prediction; at m <= 4 the fit
        # is 3.2x-3.9x faster (BENCHMARKS.md, bench/probes.py), at m = 16 no slower.
        used = np.unique(x_train.indices)
        score = StreamedScore(*fit(x_train[:, used], y_train, seed))
        for a in range(0, len(y_test), SCORE_BLOCK):
            block = slice(a, a + SCORE_BLOCK)
            score.update(budget_matrix(vals_IM[block], idx_IM[block], m, n_latents)[:, used], y_test[block])
        out[m] = score.result()
    return out


def chance_accuracy(y_train: np.ndarray, y_test: np.ndarray) -> float:
    """Accuracy of always answering the training set's most frequent class."""
    values, counts = np.unique(y_train, return_counts=True)
    return float((y_test == values[counts.argmax()]).mean())
