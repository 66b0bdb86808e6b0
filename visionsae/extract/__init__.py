"""Stage 1, ``sae-extract``: images -> backbone -> activation store (visionsae.store).

``extract(ExtractConfig(...))`` is what the CLI runs; see cli.py for the flags.
"""

from visionsae.extract.config import ExtractConfig
from visionsae.extract.pipeline import ExtractResult, extract

__all__ = ["ExtractConfig", "ExtractResult", "extract"]
