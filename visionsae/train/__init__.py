"""sae-train: SAE training on an activation store (loader, losses, regularizers, loop, resume, export)."""

from visionsae.train.config import RunSpec, TrainConfig, expand_runs
from visionsae.train.export import export_saelens, export_sparsify
from visionsae.train.regularizers import l1_l2_ratio, off_support_l1
from visionsae.train.trainer import train

__all__ = ["RunSpec", "TrainConfig", "expand_runs", "export_saelens", "export_sparsify", "l1_l2_ratio", "off_support_l1",
           "train"]
