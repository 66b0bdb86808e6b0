"""The latent explorer that ``sae-eval`` writes as index.html (see write.py for its files)."""

from visionsae.evaluate.explorer.write import write_explorer

__all__ = ["write_explorer"]
