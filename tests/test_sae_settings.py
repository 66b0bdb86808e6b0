"""Variants own their settings: a typed dataclass per variant, resolved from the trainer's flags it
declares, saved whole in the checkpoint and read back without defaults; export mappings live in the variant."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from visionsae.errors import UserError
from visionsae.sae import SAEConfig
from visionsae.sae.base import VariantSettings
from visionsae.sae.dictionary import DictionarySAE
from visionsae.sae.registry import _REGISTRY, build_sae, register, resolve_config
from visionsae.sae.relu import ReLUSettings
from visionsae.sae.softk import SoftKSettings
from visionsae.train.config import TrainConfig


def test_trainer_flags_reach_only_the_variant_that_declares_them():
    flags = TrainConfig(store="s", l1_coeff=0.25, softk_alpha=3e-4, softk_weight=7.0).to_dict()
    relu = resolve_config("relu", 8, 32, 4, flags=flags)
    softk = resolve_config("softk", 8, 32, 4, flags=flags)
    topk = resolve_config("topk", 8, 32, 4, flags=flags)
    assert relu.extra == dataclasses.asdict(ReLUSettings(l1_coeff=0.25))
    assert softk.extra["alpha"] == 3e-4 and softk.extra["k_weight"] == 7.0
    assert softk.extra["k_max"] == 8.0 and softk.extra["kest_hidden"] == 32  # the derived defaults: 2k, n
    assert topk.extra == {}
    # None keeps the default (5 / d_in for relu); a flag the variant does not declare is ignored
    assert resolve_config("relu", 8, 32, 4, flags={"l1_coeff": None, "softk_alpha": 1.0}).extra["l1_coeff"] == 5 / 8


def test_settings_are_typed_and_read_back_exactly():
    cfg = resolve_config("softk", 8, 32, 4, variance_fraction=0.5)
    model = build_sae(SAEConfig.from_dict(cfg.to_dict()))
    assert isinstance(model.settings, SoftKSettings)
    assert model.settings == SoftKSettings(**cfg.extra)
    assert isinstance(model.settings.kest_hidden, int) and isinstance(model.settings.k_max, float)


def test_a_new_variant_needs_no_change_outside_its_own_module():
    """One class with its settings and flags: the registry resolves it and the exporter asks it."""

    @dataclasses.dataclass(frozen=True)
    class ShrinkSettings(VariantSettings):
        shrink: float = 0.5
        flags = {"l1_coeff": "shrink"}

    class ShrinkSAE(DictionarySAE):
        arch = "shrink-test"
        Settings = ShrinkSettings

        def sparsify(self, z_BN, x_BD, k=None):
            return self.plain_topk(z_BN.relu() * self.settings.shrink, self.cfg.k if k is None else k)

    register(ShrinkSAE)
    try:
        cfg = resolve_config("shrink-test", 6, 12, 3, flags={"l1_coeff": 0.25})
        model = build_sae(cfg)
        assert model.settings.shrink == 0.25
        x_BD = torch.randn(5, 6)
        z_BN = model.encode_pre(x_BD)
        vals_BK, _ = (z_BN.relu() * 0.25).topk(3, dim=1)
        assert torch.allclose(model.encode(x_BD)[0].sort(1, descending=True).values, vals_BK)
        with pytest.raises(UserError, match="'shrink-test' SAE has no SAELens architecture"):
            model.saelens_export()
        with pytest.raises(KeyError, match="shrink"):
            build_sae(SAEConfig("shrink-test", 6, 12, 3, extra={}))
    finally:
        _REGISTRY.pop("shrink-test")
