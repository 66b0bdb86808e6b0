"""One model being trained: its optimiser, dead-latent counters, loss terms and running metrics.

The step is the same for every variant; what differs lives behind the model's hooks (begin_step,
support_mask, aux_losses, prepare_grads, after_step) and its ``uses_auxk`` flag.

A step never waits for the device (no ``.item()``, no boolean-mask indexing, no Python branch on a
tensor); only ``read_meter``, called on logging steps, reads values back. Whether AuxK can have any
dead latent to work on is decided on the host from an upper bound of the largest dead counter (exact
at each meter read, then grown by the rows of each step), so the term is computed exactly when it
can be non-zero and skipped, with the Top-k's sparse backward, when it cannot.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

from visionsae.sae.base import SparseAutoencoder, firing_counts
from visionsae.train.config import RunSpec
from visionsae.train.distributed import average_gradients
from visionsae.train.losses import auxk_loss, batch_stats, global_active, normalized_mse
from visionsae.train.regularizers import active_set_penalties, batch_active


class Run:
    def __init__(self, spec: RunSpec, model: SparseAutoencoder, *, lr: float, variance: float, dead_rows: int,
                 auxk_coeff: float, grad_clip: float, world: int, autocast_dtype: torch.dtype | None):
        self.spec, self.model, self.base_lr = spec, model, lr
        self.variance, self.dead_rows, self.auxk_coeff = variance, dead_rows, auxk_coeff
        self.grad_clip, self.world, self.autocast_dtype = grad_clip, world, autocast_dtype
        self.k_aux = max(1, model.cfg.d_in // 2)  # Gao et al. appendix B.1
        device = next(model.parameters()).device
        self.opt = make_adam(model.parameters(), lr)
        self.since_fired_N = torch.zeros(model.cfg.n_latents, dtype=torch.int64, device=device)
        self.since_fired_bound = 0  # host-side upper bound of since_fired_N.max()
        self.forward = model  # what the loss calls; trainer --compile swaps in torch.compile(model)
        self.reset_meter()

    # --- the step ----------------------------------------------------------------------------
    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def losses(self, x_BD: torch.Tensor, step: int, total: int):
        m, spec = self.model, self.spec
        with self._autocast(x_BD.device):
            out = self.forward(x_BD)
        terms = {"rec": normalized_mse(out.x_hat_BD, x_BD, self.variance)}
        if spec.beta_eff > 0 or spec.gamma_eff > 0:
            support_BK = m.support_mask(out)
            z_BN = out.z_BN.float()
            active_N = global_active(batch_active(out.idx_BK, m.cfg.n_latents, support_BK))
            off, ratio = active_set_penalties(z_BN, out.idx_BK, support_BK=support_BK, active_N=active_N,
                                              on=spec.reg_on)
            if spec.beta_eff > 0:
                terms["off"] = spec.beta_eff * off
            if spec.gamma_eff > 0:
                terms["ratio"] = spec.gamma_eff * ratio
        if m.uses_auxk and self.auxk_coeff > 0 and self.since_fired_bound >= self.dead_rows:
            # Some latent may be dead (the bound is the same on every rank: the counters are synchronised).
            dead_N = self.since_fired_N >= self.dead_rows
            with self._autocast(x_BD.device):
                aux = auxk_loss(m, out.z_BN, x_BD - out.x_hat_BD.float(), dead_N, self.k_aux)
            terms["auxk"] = self.auxk_coeff * aux
        terms.update(m.aux_losses(x_BD, out, step, total))
        return out, terms

    def train_step(self, x_BD: torch.Tensor, step: int, total: int, lr_factor: float) -> None:
        m = self.model
        m.train()
        m.begin_step(step, total)
        out, terms = self.losses(x_BD, step, total)
        loss = sum(terms.values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(m, self.world)
        m.prepare_grads()
        torch.nn.utils.clip_grad_norm_(m.parameters(), self.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = self.base_lr * lr_factor
        self.opt.step()
        m.after_step()
        self._count_firing(out.acts_BK, out.idx_BK, x_BD.shape[0] * self.world)
        self._accumulate(terms, loss, batch_stats(x_BD, out.x_hat_BD, out.acts_BK))

    @torch.no_grad()
    def _count_firing(self, acts_BK: torch.Tensor, idx_BK: torch.Tensor, rows: int) -> None:
        fired_N = global_active(firing_counts(acts_BK, idx_BK, self.since_fired_N.shape[0]) > 0)
        self.since_fired_N.add_(rows).masked_fill_(fired_N, 0)
        self.since_fired_bound += rows

    # --- metrics -----------------------------------------------------------------------------
    def reset_meter(self) -> None:
        self._terms: dict[str, torch.Tensor] = {}
        self._stats: torch.Tensor | None = None
        self._n = 0

    @torch.no_grad()
    def _accumulate(self, terms: dict[str, torch.Tensor], loss: torch.Tensor, stats: torch.Tensor) -> None:
        for name, v in {"loss": loss, **terms}.items():
            v = v.detach().float()
            self._terms[name] = self._terms[name] + v if name in self._terms else v
        self._stats = stats if self._stats is None else self._stats + stats
        self._n += 1

    def dead_fraction(self) -> float:
        return float((self.since_fired_N >= self.dead_rows).float().mean())

    def refresh_bound(self) -> None:
        """Make the host's bound exact again: a device read, so the trainer calls it on logging steps, at
        steps fixed by the schedule (a run stopped and resumed elsewhere must refresh at the same steps)."""
        self.since_fired_bound = int(self.since_fired_N.max())

    @torch.no_grad()
    def read_meter(self) -> dict[str, float]:
        """Means since the last read, over all ranks (a collective: every rank calls it at the same step)."""
        if self._stats is None:
            return {"dead_frac": self.dead_fraction(), "lr": self.opt.param_groups[0]["lr"]}
        names = sorted(self._terms)
        vec = torch.cat([torch.stack([self._terms[n] / max(self._n, 1) for n in names]) if names
                         else torch.zeros(0, device=self.since_fired_N.device), self._stats.float()])
        if self.world > 1:
            dist.all_reduce(vec)
            vec[: len(names)] /= self.world
        vals = vec.tolist()
        out: dict[str, Any] = dict(zip(names, vals[: len(names)]))
        sse, tot, fired, rows = vals[len(names):]
        out.update(fvu=sse / max(tot, 1e-12), l0=fired / max(rows, 1), dead_frac=self.dead_fraction(),
                   lr=self.opt.param_groups[0]["lr"])
        self.reset_meter()
        return out

    # --- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optim": self.opt.state_dict(), "since_fired": self.since_fired_N.cpu(),
                "since_fired_bound": self.since_fired_bound}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        self.since_fired_N.copy_(state["since_fired"].to(self.since_fired_N.device))
        # The saved bound, not a fresh one: it decides whether AuxK runs, and a resumed run must take the
        # same path (and the same rounding) as an uninterrupted one.
        if "since_fired_bound" in state:
            self.since_fired_bound = int(state["since_fired_bound"])
        else:
            self.refresh_bound()


def make_adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one pass over every parameter, no per-step host reads) where this
    torch has it for the parameters' device; the foreach implementation otherwise."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
