"""The interface every SAE variant implements; training and evaluation see only this.

Shape suffixes: B batch, D input width, N latents, K kept latents per input.

A variant maps raw inputs x_BD to a sparse code (values and indices of the kept latents) and back.
The code is always returned as a pair (acts_BK, idx_BK): K is the training k for Top-k models, the
largest per-input k in the batch for SoftSAE (shorter rows padded with zeros), and the largest
number of firing latents in the batch for ReLU / BatchTopK. Zero entries are padding (not firing).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar, Mapping, NamedTuple

import torch
from torch import nn

from visionsae.errors import UserError


@dataclasses.dataclass
class SAEConfig:
    """Everything needed to rebuild a model's modules (JSON-able; stored in the checkpoint)."""

    arch: str  # "topk" | "softk" | "batchtopk" | "relu"
    d_in: int
    n_latents: int
    k: int  # training sparsity (topk/batchtopk/softk target); for relu the nominal k for comparisons
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # variant-specific hyperparameters

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        return cls(arch=d["arch"], d_in=int(d["d_in"]), n_latents=int(d["n_latents"]), k=int(d["k"]),
                   extra=dict(d.get("extra", {})))


def setting(cfg: SAEConfig, key: str) -> Any:
    """A variant's resolved setting from ``cfg.extra``. Defaults are resolved once, when a model is first
    configured (``registry.resolve_config``), and saved with it, so a later change of a default never
    changes what a saved model computes; a missing key is an error, never a silent default."""
    if key not in cfg.extra:
        raise KeyError(f"the {cfg.arch} config has no setting '{key}' (a checkpoint from an older visionsae, "
                       f"which did not save it?): retrain, or add the value to config.extra")
    return cfg.extra[key]


@dataclasses.dataclass(frozen=True)
class VariantSettings:
    """A variant's own settings, typed; every field is saved in ``SAEConfig.extra`` (the checkpoint).

    Each variant module defines its subclass (fields, ``defaults`` and the trainer flags it reads) and
    names it in its class's ``Settings``; the trainer and the registry never know a field by name."""

    # trainer flag (a TrainConfig field) -> the field it sets; a flag left None keeps the default
    flags: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def defaults(cls, d_in: int, n_latents: int, k: int, variance_fraction: float) -> "VariantSettings":
        """Every field at its default. ``variance_fraction``: the data's E||x - mean||^2 / E||x||^2 (1 when
        unknown), for settings whose reference values are stated for differently normalised inputs."""
        return cls()

    @classmethod
    def resolve(cls, d_in: int, n_latents: int, k: int, variance_fraction: float,
                flags: Mapping[str, Any], overrides: Mapping[str, Any]) -> "VariantSettings":
        """Defaults, then the trainer ``flags`` this variant reads (``cls.flags``), then ``overrides`` by
        field name; None means default, and names the variant does not have are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {cls.flags[key]: v for key, v in flags.items() if key in cls.flags and v is not None}
        given.update({key: v for key, v in overrides.items() if key in names and v is not None})
        return dataclasses.replace(cls.defaults(d_in, n_latents, k, variance_fraction), **given)

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> "VariantSettings":
        """The settings saved in ``cfg.extra``, each required (``setting``: no default at load time)."""
        types = typing.get_type_hints(cls)
        return cls(**{f.name: types[f.name](setting(cfg, f.name)) for f in dataclasses.fields(cls)})

    def to_extra(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def latent_counts(idx_BK: torch.Tensor, n: int, mask_BK: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [n]: how many entries of idx_BK name each latent, counting only where mask_BK (all when None).

    With mask_BK = acts_BK > 0 it is the number of rows each latent fires on, the one firing count that
    training (dead latents), validation and sae-eval use. A count per unit instead of indexing with the
    mask: no host synchronisation."""
    counts_N = torch.zeros(n, dtype=torch.int64, device=idx_BK.device)
    if idx_BK.ndim == 2 and idx_BK.stride(0) == 0:  # one index row for the whole batch (a dense code)
        # a column sum of the mask (bool sums to int64): no B x n int64 copy of it
        per_col = torch.full_like(idx_BK[0], idx_BK.shape[0]) if mask_BK is None else mask_BK.sum(0)
        return counts_N.index_add_(0, idx_BK[0], per_col)
    hits_BK = torch.ones_like(idx_BK) if mask_BK is None else mask_BK.to(torch.int64)
    return counts_N.index_add_(0, idx_BK.reshape(-1), hits_BK.reshape(-1))


def support_BN(idx_BK: torch.Tensor, n: int, mask_BK: torch.Tensor | None = None) -> torch.Tensor:
    """The code's support S as a dense bool B x n mask: the entries of idx_BK (only where mask_BK)."""
    src_BK = torch.ones_like(idx_BK, dtype=torch.bool) if mask_BK is None else mask_BK.to(torch.bool)
    return torch.zeros(idx_BK.shape[0], n, dtype=torch.bool, device=idx_BK.device).scatter_(1, idx_BK, src_BK)


def firing_counts(acts_BK: torch.Tensor, idx_BK: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [n]: rows of the code (acts_BK, idx_BK) on which each latent fires (a zero entry is padding)."""
    return latent_counts(idx_BK, n, acts_BK > 0)


class SAEOutput(NamedTuple):
    x_hat_BD: torch.Tensor  # reconstruction
    z_BN: torch.Tensor  # encoder output entering the sparsifier (before Top-k / ReLU gating)
    acts_BK: torch.Tensor  # kept activation values, >= 0; zeros are padding
    idx_BK: torch.Tensor  # int64 latent indices of acts_BK
    k_B: torch.Tensor | None  # per-input k (SoftSAE); None where k is fixed


class SparseAutoencoder(nn.Module):
    """Base class: ``encode_pre`` -> ``sparsify`` -> ``decode``.

    Subclasses set ``arch`` and implement ``encode_pre`` and ``sparsify``; they may add loss terms
    in ``aux_losses`` and override ``fold_input_scale``.
    """

    arch: ClassVar[str]
    Settings: ClassVar[type[VariantSettings]] = VariantSettings  # the variant's own (module-local) settings

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.settings = self.Settings.from_config(cfg)

    # --- exports (default: none; a variant with a counterpart in another library overrides them) --------
    def saelens_export(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        """(SAELens architecture, weights by SAELens name, cfg.json fields beyond the common ones)."""
        raise UserError(f"a '{self.arch}' SAE has no SAELens architecture: evaluate it with sae-eval instead")

    def sparsify_export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(weights by sparsify name, sparsify's cfg.json): EleutherAI sparsify's coders are plain Top-k."""
        raise UserError(f"a '{self.arch}' SAE has no sparsify counterpart (sparsify's coders are plain Top-k): "
                        "export a topk run, or use --export-saelens")

    # --- the three steps -------------------------------------------------------------------
    def encode_pre(self, x_BD: torch.Tensor) -> torch.Tensor:
        """z_BN: the pre-sparsity encoder output (what the paper's regularizers act on)."""
        raise NotImplementedError

    def sparsify(self, z_BN: torch.Tensor, x_BD: torch.Tensor, k: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(acts_BK, idx_BK, k_B): keep the active latents of z. ``k`` overrides the training k."""
        raise NotImplementedError

    def decode(self, acts_BK: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
        """x_hat_BD = sum_k acts_BK[:, k] * W_dec[idx_BK[:, k]] + b_dec, gathering K decoder rows."""
        raise NotImplementedError

    # --- composed ----------------------------------------------------------------------------
    def encode(self, x_BD: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z_BN = self.encode_pre(x_BD)
        acts_BK, idx_BK, _ = self.sparsify(z_BN, x_BD, k)
        return acts_BK, idx_BK

    def forward(self, x_BD: torch.Tensor, k: int | None = None) -> SAEOutput:
        z_BN = self.encode_pre(x_BD)
        acts_BK, idx_BK, k_B = self.sparsify(z_BN, x_BD, k)
        return SAEOutput(self.decode(acts_BK, idx_BK), z_BN, acts_BK, idx_BK, k_B)

    def dense_code(self, acts_BK: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
        """The code as a dense B x N matrix (for evaluation; training never needs it)."""
        out_BN = acts_BK.new_zeros(acts_BK.shape[0], self.cfg.n_latents)
        return out_BN.scatter_(1, idx_BK, acts_BK)

    # --- training hooks (defaults: nothing) --------------------------------------------------
    def aux_losses(self, x_BD: torch.Tensor, out: SAEOutput, step: int, total_steps: int
                   ) -> dict[str, torch.Tensor]:
        """Variant-specific loss terms, already weighted (e.g. SoftSAE's k penalty, ReLU's l1)."""
        return {}

    def fold_input_scale(self, scale: float) -> None:
        """Training saw x * scale; change parameters in place so the model maps raw x."""
        raise NotImplementedError

    # --- more training hooks (defaults: nothing), called by the loop in this order ---------------
    uses_auxk: ClassVar[bool] = False  # whether the loop adds the AuxK dead-latent loss (needs decode_latents)

    def init_from_sample(self, x_BD: torch.Tensor) -> None:
        """Data-dependent initialisation from a sample of (scaled) training inputs, before step 0."""

    def begin_step(self, step: int, total_steps: int) -> None:
        """Called before each training forward (schedules that depend on progress: k annealing, hard phase)."""

    def support_mask(self, out: SAEOutput) -> torch.Tensor | None:
        """Which entries of out.idx_BK are the input's support S_i (None: all of them)."""
        return None

    def decode_latents(self, acts_BK: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
        """The decoder's sum over the kept latents WITHOUT the output bias (AuxK reconstructs a residual)."""
        raise NotImplementedError

    def prepare_grads(self) -> None:
        """After backward, before clipping and the optimiser step (e.g. project decoder gradients)."""

    def after_step(self) -> None:
        """After the optimiser step (e.g. renormalise decoder rows)."""

    needs_calibration: ClassVar[bool] = False  # whether calibrate does anything (the trainer then keeps rows for it)

    def calibrate(self, x_BD: torch.Tensor) -> None:
        """Fit inference-only settings to the current weights on training rows x_BD (scaled units).

        Called before every saved checkpoint, outside the training step (BatchTopK's threshold)."""
