"""arch name -> SAE class. Variants register themselves with ``@register``."""

from __future__ import annotations

from typing import Callable

from visionsae.errors import UserError
from visionsae.sae.base import SAEConfig, SparseAutoencoder

_REGISTRY: dict[str, type[SparseAutoencoder]] = {}


def register(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
    _REGISTRY[cls.arch] = cls
    return cls


def architectures() -> list[str]:
    _import_variants()
    return sorted(_REGISTRY)


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    _import_variants()
    if cfg.arch not in _REGISTRY:
        raise UserError(f"unknown SAE architecture '{cfg.arch}': choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[cfg.arch](cfg)


def _import_variants() -> None:
    # Imported lazily so that registry <- variant modules has no import cycle.
    from visionsae.sae import batchtopk, relu, softk, topk  # noqa: F401
