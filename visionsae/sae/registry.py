"""arch name -> SAE class. Variants register themselves with ``@register``."""

from __future__ import annotations

from typing import Any, Mapping

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


def resolve_config(arch: str, d_in: int, n_latents: int, k: int, *, variance_fraction: float = 1.0,
                   flags: Mapping[str, Any] | None = None, **overrides: Any) -> SAEConfig:
    """An SAEConfig whose ``extra`` holds EVERY setting of the variant, resolved now: its defaults, then the
    trainer ``flags`` it declares (``Settings.flags``), then ``overrides`` by setting name (None means
    default). Names the variant does not have are ignored, so a caller can pass every flag it has."""
    _import_variants()
    if arch not in _REGISTRY:
        raise UserError(f"unknown SAE architecture '{arch}': choose one of {', '.join(sorted(_REGISTRY))}")
    settings = _REGISTRY[arch].Settings.resolve(d_in, n_latents, k, variance_fraction, flags or {}, overrides)
    return SAEConfig(arch=arch, d_in=d_in, n_latents=n_latents, k=k, extra=settings.to_extra())


def _import_variants() -> None:
    # Imported lazily so that registry <- variant modules has no import cycle.
    from visionsae.sae import batchtopk, relu, softk, topk  # noqa: F401
