"""sae-train's one function: every configuration asked for, trained on one shared pass over the store.

    train(TrainConfig(store="acts.zarr", k=(16, 32), reg=("none", "off", "ratio", "both")))

Inputs are scaled by s = sqrt(d / mean_sq_norm) (store statistics) so that E||x||^2 = d; the
checkpoint folds s back into the weights, so it maps raw activations.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from visionsae.errors import UserError
from visionsae.runs import RUN_LAYOUT, Run as RunDir
from visionsae.sae.base import SAEConfig
from visionsae.sae.checkpoint import read_checkpoint, save_checkpoint
from visionsae.device import resolve_device
from visionsae.sae.registry import build_sae, resolve_config
from visionsae.store import Store, open_store
from visionsae.train import distributed
from visionsae.train.config import RunSpec, TrainConfig, default_lr, describe_runs, expand_runs
from visionsae.train.validation import validation_metrics
from visionsae.train.export import export_saelens, export_sparsify
from visionsae.train.loader import Loader, make_split
from visionsae.train.training_run import Run
from visionsae.train.run_dir import (append_log, check_out_dir, check_resumable, clear_out_dir, has_run_files,
                                   load_state, prepare_out_dir, run_dirs, save_state, truncate_log, write_json)

INIT_SAMPLE_ROWS = 8192  # rows for the geometric-median initialisation of b_dec
MAX_DEAD_ROWS = 10_000_000  # the LLM-scale dead threshold (Gao et al.); smaller datasets scale it down


def default_dead_rows(n_train_rows: int, total_rows: int, batch_size: int) -> int:
    """A latent is dead when it has not fired in the last N rows: N = min(10M, 3 epochs, a tenth of the
    run), at least one batch. Three epochs is the longest one can wait on a small dataset; a tenth of
    the run keeps AuxK useful in runs shorter than that."""
    return max(batch_size, min(MAX_DEAD_ROWS, 3 * n_train_rows, total_rows // 10))


def default_save_every(total: int) -> int:
    """Four saves a run at least, so that any run can be resumed; at most every 1000 steps."""
    return max(1, min(1000, math.ceil(total / 4)))


def lr_factor(step: int, total: int, warmup: int, decay_frac: float) -> float:
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay = int(decay_frac * total)
    if decay > 0 and step >= total - decay:
        f *= (total - step) / decay
    return f


def _device_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"the GPU {device}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"


def _preload_fits(cfg: TrainConfig, n_rows: int, d: int, dtype: str, device: torch.device) -> bool:
    if cfg.preload != "auto":
        return cfg.preload == "yes"
    need = n_rows * d * (4 if dtype == "float32" else 2)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need <= 0.4 * free  # the rest is for the models, optimiser moments and activations
    return need <= 0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _scale_and_variance(store: Store, layer: str) -> tuple[float, float]:
    info = store.layer(layer)
    if not info.mean_sq_norm > 0:
        raise UserError(f"layer '{layer}' of {store.path} has mean squared norm {info.mean_sq_norm}: "
                        "its activations are all zero; choose another layer")
    scale = math.sqrt(info.d / info.mean_sq_norm)
    variance = scale ** 2 * (info.mean_sq_norm - float(np.dot(info.mean, info.mean)))
    if not variance > 1e-9 * info.d:
        raise UserError(f"layer '{layer}' of {store.path} has (almost) no variance: every activation is the same")
    return scale, variance


def _sae_config(cfg: TrainConfig, spec: RunSpec, d: int, n: int, variance: float) -> SAEConfig:
    # Every variant setting is resolved here and saved in the checkpoint (issue 13); each variant reads the
    # flags it declares (its Settings.flags), None = the default.
    return resolve_config(spec.arch, d, n, spec.k, variance_fraction=variance / d, flags=cfg.to_dict())


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.store = open_store(cfg.store)
        info = self.store.layer(cfg.layer)
        self.cfg = cfg = dataclasses.replace(cfg, layer=info.name)
        self.d, self.n = info.d, cfg.latents_for(info.d)
        for k in cfg.k:
            if k >= self.n:
                raise UserError(f"--k {k} must be below the number of latents ({self.n}): lower --k or raise "
                                "--expansion / --n-latents")
        self.specs = expand_runs(cfg)
        self.device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        cfg.check_memory(self.d, self.n, len(self.specs), *_device_memory(self.device))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # before NCCL starts: one GPU per rank
        self.dist = distributed.setup(self.device.type)
        self.out = Path(cfg.out) if cfg.out else Path("runs") / f"{Path(cfg.store).stem}-{info.name}"
        names = [s.name for s in self.specs]
        self.dirs = run_dirs(self.out, names)
        self.lock = prepare_out_dir(self.out, names, self.dist)  # one writer per run directory
        # Every rank checks (read-only, the same answer everywhere), so a refusal never strands a rank.
        self.fresh = check_out_dir(self.out, names, resume=cfg.resume, overwrite=cfg.overwrite)

        self.scale, self.variance = _scale_and_variance(self.store, info.name)
        self.train_slots, self.val_slots = make_split(self.store, cfg.val_fraction, cfg.seed)
        self.store_id = {"path": str(Path(cfg.store).resolve()), "fingerprint": self.store.fingerprint,
                         "layer_fingerprint": self.store.layer_fingerprint(info.name), "layer": info.name,
                         "d": int(info.d), "backbone": self.store.backbone.get("id")}
        self.state = load_state(self.out) if cfg.resume and not self.fresh else None
        if self.state is not None:
            check_resumable(self.state["config"], cfg.to_dict(), self.state["store"], self.store_id)
        n_train = int(self.train_slots.size) * info.tokens_per_image
        self.loader = Loader(
            self.store, info.name, self.train_slots, batch_size=cfg.batch_size, seed=cfg.seed, device=self.device,
            scale=self.scale, preload=_preload_fits(cfg, n_train, info.d, info.dtype, self.device),
            buffer_bytes=cfg.buffer_mb << 20, prefetch=cfg.prefetch, rank=self.dist.rank, world=self.dist.world,
            group_shards=None if self.state is None else int(self.state["loader"]["group_shards"]))
        n_rows = self.loader.n_rows
        self.total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * n_rows / cfg.batch_size))
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, self.total // 10)
        self.dead_rows = cfg.dead_rows or default_dead_rows(n_rows, self.total * cfg.batch_size, cfg.batch_size)
        self.lr = cfg.lr or default_lr(self.n, self.total)
        self.save_every = cfg.save_every if cfg.save_every is not None else default_save_every(self.total)
        self.saved_step: int | None = None
        autocast = cfg.autocast == "bf16" or (cfg.autocast == "auto" and self.device.type == "cuda")
        self.runs = []
        for spec in self.specs:
            torch.manual_seed(cfg.seed)  # every configuration starts from the same dictionary
            model = build_sae(_sae_config(cfg, spec, self.d, self.n, self.variance)).to(self.device)
            self.runs.append(Run(spec, model, lr=self.lr, variance=self.variance, dead_rows=self.dead_rows,
                                 auxk_coeff=cfg.auxk_coeff, grad_clip=cfg.grad_clip, world=self.dist.world,
                                 autocast_dtype=torch.bfloat16 if autocast else None))
        if cfg.compile:
            for run in self.runs:
                run.forward = torch.compile(run.model)  # parameters stay the model's: saving is unchanged
        self.step = 0
        if self.state is not None:
            for run in self.runs:
                run.load_state_dict(self.state["runs"][run.spec.name])
            self.step = int(self.state["step"])
            torch.set_rng_state(self.state["rng"]["torch"])
        else:
            # Reading the sample reads (and checksums) the first shards before anything is written.
            sample_BD = self.loader.sample(INIT_SAMPLE_ROWS)
            for run in self.runs:
                run.model.init_from_sample(sample_BD)
        # Rows on which models fit inference-only settings to their current weights (BatchTopK's threshold):
        # the initialisation sample (the loader's first rows either way), read again only on resume.
        self.calib_BD = None
        if any(r.model.needs_calibration for r in self.runs):
            self.calib_BD = sample_BD if self.state is None else self.loader.sample(INIT_SAMPLE_ROWS)

    # --- saving ------------------------------------------------------------------------------
    def _train_meta(self, spec: RunSpec) -> dict[str, Any]:
        c = self.cfg
        return {"name": spec.name, "arch": spec.arch, "k": spec.k, "reg": spec.reg, "reg_on": spec.reg_on,
                "beta": spec.beta_eff,
                "gamma": spec.gamma_eff, "n_latents": self.n, "lr": self.lr, "batch_size": c.batch_size,
                "total_steps": self.total, "warmup_steps": self.warmup, "decay_frac": c.decay_frac,
                "grad_clip": c.grad_clip, "auxk_coeff": c.auxk_coeff, "dead_rows": self.dead_rows,
                "seed": c.seed, "world_size": self.dist.world, "train_rows": self.loader.n_rows}

    def save(self, metrics: dict[str, dict[str, float]], calibrate: bool = True) -> None:
        """Checkpoints of every run, then the trainer state; rank 0 writes, every rank waits for it."""
        for run in self.runs:  # never replace a good checkpoint with a diverged model (weights equal on all ranks)
            if not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
                raise UserError(self._diverged(run.spec.name, "its weights are not finite"))
        if calibrate:
            self._calibrate()
        if self.dist.main:
            split = {"val_slots": torch.from_numpy(self.val_slots.copy()), "val_fraction": self.cfg.val_fraction,
                     "seed": self.cfg.seed}
            for run in self.runs:
                folded = copy.deepcopy(run.model).cpu()
                folded.fold_input_scale(self.scale)
                save_checkpoint(self.dirs[run.spec.name] / "ckpt.pt", folded, input_scale=self.scale,
                                store=self.store_id, split=split, train=self._train_meta(run.spec),
                                step=self.step, metrics=metrics.get(run.spec.name, {}))
            save_state(self.out, {
                "step": self.step, "config": self.cfg.to_dict(), "store": self.store_id,
                "loader": {"group_shards": self.loader.group_shards, "batch_size": self.cfg.batch_size},
                "rng": {"torch": torch.get_rng_state()},
                "runs": {run.spec.name: run.state_dict() for run in self.runs}})
        self.dist.barrier()
        self.saved_step = self.step

    def _diverged(self, name: str, what: str) -> str:
        saved = self.saved_step if self.saved_step is not None else (self.state or {}).get("step")
        kept = f"the last good checkpoint (step {saved}) is kept" if saved is not None else "nothing was saved"
        return (f"run {name} diverged at or before step {self.step} ({what}): stopped; {kept}. Lower --lr "
                "(or --grad-clip) and rerun with --overwrite")

    def _check_finite(self, last: dict[str, dict[str, float]]) -> None:
        """At logging steps, where the losses are on the host anyway: stop a run whose loss is NaN or inf."""
        for name, rec in last.items():
            if "loss" in rec and not math.isfinite(rec["loss"]):
                raise UserError(self._diverged(name, f"its loss is {rec['loss']}"))

    def _calibrate(self) -> None:
        """issue 13: every model's inference-only settings fitted to its current weights (same rows on every rank)."""
        if self.calib_BD is not None:
            for run in self.runs:
                run.model.calibrate(self.calib_BD)

    def _log(self, run: Run, record: dict[str, Any]) -> None:
        if self.dist.main:
            append_log(self.dirs[run.spec.name] / "log.jsonl", record)

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> list[Path]:
        cfg, main = self.cfg, self.dist.main
        stop = self.total if cfg.stop_at_step is None else min(self.total, max(cfg.stop_at_step, self.step))
        if self.state is not None and self.step >= self.total:  # a finished run is left as it is
            self.loader.close()
            if main:
                self._log_missing_final()
                print(f"{self.out} holds a finished run (step {self.step} of {self.total}): nothing to resume; "
                      "pass --overwrite to train it again")
            return [self.dirs[r.spec.name] / "ckpt.pt" for r in self.runs]
        if main and (cfg.overwrite or self.fresh):
            if self.fresh and has_run_files(self.out, [s.name for s in self.specs]):
                print(f"note: nothing saved in {self.out} to resume from; starting the run afresh")
            clear_out_dir(self.out, [s.name for s in self.specs])
        if main and self.state is not None:
            for run in self.runs:  # a killed run may have logged steps past its last saved state
                truncate_log(self.dirs[run.spec.name] / "log.jsonl", self.step)
        if main:
            write_json(self.out / "config.json", {"run_layout": RUN_LAYOUT,
                                                  "train": cfg.to_dict(), "store": self.store_id,
                                                  "runs": [s.name for s in self.specs], "total_steps": self.total,
                                                  "input_scale": self.scale, "dead_rows": self.dead_rows})
        bar = tqdm(total=self.total, initial=self.step, disable=not (cfg.progress and main), dynamic_ncols=True,
                   desc=describe_runs(self.specs))
        t0, last = time.perf_counter(), {}
        batches = self.loader.batches(self.step)
        try:
            while self.step < stop:
                x_BD = next(batches)
                f = lr_factor(self.step, self.total, self.warmup, cfg.decay_frac)
                for run in self.runs:
                    run.train_step(x_BD, self.step, self.total, f)
                self.step += 1
                bar.update(1)
                if self.step % max(cfg.log_every, 1) == 0:
                    for run in self.runs:
                        run.refresh_bound()
                if self.step % max(cfg.log_every, 1) == 0 or self.step == stop:
                    last = self._log_all(t0)
                    self._check_finite(last)
                    first = last[self.runs[0].spec.name]
                    bar.set_postfix(loss=f"{first['loss']:.4f}", fvu=f"{first['fvu']:.4f}",
                                    l0=f"{first['l0']:.1f}", dead=f"{first['dead_frac']:.3f}")
                if self.save_every and self.step % self.save_every == 0 and self.step < stop:
                    self.save(last)
        finally:
            bar.close()
            self.loader.close()
        if self.step < self.total:  # a scheduled stop: everything needed to continue is on disk
            self.save(last)
            if main:
                print(f"stopped at step {self.step} of {self.total}; continue with the same command plus --resume")
            return [self.dirs[r.spec.name] / "ckpt.pt" for r in self.runs]
        self._calibrate()  # before the final validation, which measures the inference rule
        final = self._final_metrics(last)
        self.save(final, calibrate=False)  # the same weights: already fitted
        # The final record last, after the final checkpoint: a run whose log ends with it is finished (run_layout.md)
        for run in self.runs:
            self._log(run, {"event": "final", "step": self.step, **final.get(run.spec.name, {})})
        paths = [self.dirs[r.spec.name] / "ckpt.pt" for r in self.runs]
        asked = ((cfg.export_saelens, export_saelens, "saelens", "SAELens"),
                 (cfg.export_sparsify, export_sparsify, "sparsify", "sparsify"))
        for export, sub, what in [(f, sub, what) for on, f, sub, what in asked if on and main]:
            for p in paths:
                try:
                    export(p, p.parent / sub)
                except UserError as err:  # the variant's one-line refusal
                    print(f"note: no {what} export for {p.parent.name}: {err}")
        return paths

    def _log_missing_final(self) -> None:
        """A writer killed between the final save and the final records: write them from the final checkpoints."""
        for run in self.runs:
            r = RunDir(run.spec.name, self.dirs[run.spec.name])
            if r.final() is None and r.checkpoint.is_file():
                metrics = read_checkpoint(r.checkpoint)["metrics"]
                truncate_log(r.log, self.step)  # a record cut short by the kill
                self._log(run, {"event": "final", "step": self.step, **metrics})

    def _log_all(self, t0: float) -> dict[str, dict[str, float]]:
        out = {}
        for run in self.runs:
            rec = run.read_meter()
            rec.update(step=self.step, rows=self.step * self.cfg.batch_size,
                       seconds=round(time.perf_counter() - t0, 3))
            self._log(run, rec)
            out[run.spec.name] = rec
        return out

    def _final_metrics(self, last: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        metrics: dict[str, dict[str, float]] = {}
        if self.dist.main:
            x_val = (validation_rows(self.store, self.cfg.layer, self.val_slots) * self.scale
                     if self.val_slots.size else None)
            for run in self.runs:
                metrics[run.spec.name] = {f"train_{k}": float(v) for k, v in last.get(run.spec.name, {}).items()
                                          if k in ("fvu", "l0", "dead_frac", "loss")}
                if x_val is not None:
                    m = validation_metrics(run.model, x_val, batch_size=self.cfg.batch_size, device=self.device)
                    metrics[run.spec.name].update({f"val_{k}": v for k, v in m.items()})
        self.dist.barrier()
        return metrics


MAX_VAL_ROWS = 1 << 18


def validation_rows(store: Store, layer: str, val_slots: np.ndarray) -> torch.Tensor:
    """Rows of the held-out images (the first ones, up to MAX_VAL_ROWS rows), float32."""
    T = store.layer(layer).tokens_per_image
    slots = val_slots[: max(1, MAX_VAL_ROWS // T)]
    return torch.from_numpy(store.read_slots(layer, slots))


def train(cfg: TrainConfig) -> list[Path]:
    """Train every configuration of ``cfg``; the checkpoint paths, one per configuration."""
    trainer = None
    try:
        trainer = Trainer(cfg)
        return trainer.run()
    finally:
        if trainer is not None and trainer.lock is not None:
            trainer.lock.release()
        distributed.teardown()
