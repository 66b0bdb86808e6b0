"""sae-eval: reconstruction, sparsity, robustness to k, monosemanticity, purity and probes of SAE checkpoints.

Evaluation reads stores (visionsae.store) and checkpoints (visionsae.sae) only; it never imports
the extract or train stages. The choices it makes, in one place:

- Data: the store each checkpoint records (or ``--store``), refused unless layer, width and store
  fingerprint match. Images: the checkpoint's held-out slots (``meta["split"]["val_slots"]``) that
  are valid; checkpoints of one store layer are evaluated together, on the held-out images they
  all share, in one pass over the data. ``--store`` may also name a sibling: another store with the
  checkpoint's layer fingerprint (same backbone, preprocessing, tokens and layer; another split or
  dataset). Then every valid image of it is evaluated on, and the probes train on the training
  store's non-held-out images (skipped, with the reason in the report, when it is not here or
  labels another dataset). This is how coefficients chosen on the held-out part of a train split
  are reported on a test split.
- Reconstruction and sparsity: per row (token), float64 sums (metrics.py has the definitions).
  Code concentration is measured on the positive part z+ of the pre-sparsity output z (only
  positive values can enter a Top-k / ReLU code): mean ||z+||_1 / ||z+||_2, and the number of
  latents carrying 90% of the l1 mass of z+ (also of the kept code). SoftSAE: the distribution of
  the per-input k as the model reports it (the continuous estimate; floor(k) latents are kept).
- k-sweep: every reconstruction metric again with the model keeping k' latents (``model(x, k=k')``).
- Image level (MS, purity, top images, probes): a latent's activation on an image is its maximum
  over the image's tokens. MS compares images through the store's own image-level vectors (class
  token where the layer has one, else the mean of the tokens) unless ``--ms-embeddings`` names a
  store of another backbone over the same images (joined on the dataset index).
- Purity: over each latent's top ``top_images`` (50) firing images and over all images it fires on.
- Probes: multinomial logistic regression (scikit-learn, lbfgs, max-abs scaled) on each image's m
  largest latents, trained on up to ``probe_train_images`` (10,000) labelled images outside the
  held-out sets, scored on the held-out images; the same probe on raw image-level activations
  (z-scored) is the reference.
- Output: ``--out`` (default ./eval-report, one report for all checkpoints given, so the training
  runs' folders stay as sae-train wrote them): report.json, report.md, PNG plots, and the latent
  explorer (index.html, explorer/, thumbs/: every latent, its images, heatmaps and class effects).
"""

from visionsae.evaluate.config import EvalConfig

__all__ = ["EvalConfig", "evaluate", "run"]


def evaluate(cfg: EvalConfig):
    """Compute every metric (no files written); see evaluation.evaluate."""
    from visionsae.evaluate.evaluation import evaluate as _evaluate
    return _evaluate(cfg)


def run(cfg: EvalConfig):
    """Compute and write the report directory; see evaluation.run."""
    from visionsae.evaluate.evaluation import run as _run
    return _run(cfg)
