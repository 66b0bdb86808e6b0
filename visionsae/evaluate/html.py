"""index.html: the latent explorer (every latent of every checkpoint; visionsae.evaluate.explorer)."""

from __future__ import annotations

from pathlib import Path


def write_html(result, out: Path, figures: dict[str, str]) -> Path:
    from visionsae.evaluate.explorer import write_explorer
    return write_explorer(result, out, figures)
