"""SAE variants and their checkpoint: the contract shared by training and evaluation."""

from visionsae.sae.base import SAEConfig, SAEOutput, SparseAutoencoder
from visionsae.sae.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from visionsae.sae.registry import architectures, build_sae

__all__ = ["SAEConfig", "SAEOutput", "SparseAutoencoder", "architectures", "build_sae",
           "load_checkpoint", "read_checkpoint", "save_checkpoint"]
