"""What sae-train is asked to do: one dataclass that is the CLI (cli_options), and the runs it expands to.

Comma-separated ``arch``, ``k``, ``reg``, ``beta`` and ``gamma`` expand to every combination; all of
them train in one pass over the data, sharing each batch.

Regularizer weights (``beta`` off-support l1, ``gamma`` l1/l2 ratio). Inputs are scaled so that
E||x||^2 = d and the reconstruction loss is the squared error divided by the scaled variance (the
fraction of variance unexplained, near 1 at initialisation). With unit-norm encoder rows each pre-activation
|z_ij| is then O(1) (about ||x|| / sqrt(d) for an unaligned row), and the batch-active set A holds up to
min(n, k*B) units: the off-support sum starts near 0.8 |A|, thousands for 16k latents, while the
ratio ||z_A||_1 / ||z_A||_2 lies in [1, sqrt(|A|)] (about 0.8 sqrt(|A|), ~100, when z is dense). The
defaults beta = 1e-5 and gamma = 1e-3 make each term start at a sixth to a tenth of the reconstruction
loss for 16k latents (measured at initialisation, d = 768, k = 32, batch 2048: reconstruction 0.75,
beta * L_off = 0.12, gamma * L_ratio = 0.10; less for smaller dictionaries): strong enough to shape
the code, too weak to dominate reconstruction. Both terms then fall as training concentrates the code
(on planted synthetic data, 400 steps: off-support by half, the ratio by a quarter).
Sweep them with lists, e.g. ``--beta 1e-6,1e-5,1e-4``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from visionsae.cli_options import option
from visionsae.errors import UserError

REGS = ("none", "off", "ratio", "both")
MAX_ROWS = 1 << 62  # the step and row counters are int64
MAX_LATENTS = 1 << 31
REG_ON = ("raw", "relu")  # the same names as visionsae.train.regularizers.REG_ON
DEFAULT_BETA = 1e-5
DEFAULT_GAMMA = 1e-3


@dataclasses.dataclass
class TrainConfig:
    store: str = option(help="Activation store written by sae-extract (Zarr directory or HDF5 file).")
    layer: str | None = option(None, help="Layer of the store (needed when it holds several).")
    arch: tuple[str, ...] = option(("topk",), help="topk|softk|batchtopk|relu, or a list.")
    k: tuple[int, ...] = option((32,), help="Latents kept per input (list allowed).")
    expansion: float | None = option(None, help="Latents = expansion * d (default 8).")
    n_latents: int | None = option(None, help="Number of latents (instead of --expansion).")
    reg: tuple[str, ...] = option(("none",), help="Regularizer: none|off|ratio|both (off: off-support l1, ratio: "
                                                  "l1/l2), or a list.")
    beta: tuple[float, ...] = option((DEFAULT_BETA,), help="Off-support l1 weight(s).")
    gamma: tuple[float, ...] = option((DEFAULT_GAMMA,), help="l1/l2 ratio weight(s).")
    reg_on: tuple[str, ...] = option(("raw",), help="What the penalties measure (regularizers.py): raw (|z|, negative "
                                     "pre-activations included, the paper's sample code) or relu (relu(z), only what "
                                     "can enter the code), or a list.")
    lr: float | None = option(None, help="Adam learning rate (default 2e-4 * sqrt(2^14 / n_latents) x m, m = 3 for "
                              "runs up to 1,000 steps, falling as 1/steps to 1 at 3,000; see BENCHMARKS.md and "
                              "config.default_lr).")
    batch_size: int = option(4096)
    steps: int | None = option(None, help="Optimisation steps.")
    epochs: float | None = option(None, help="Passes over the training rows (default 1).")
    val_fraction: float = option(0.05, help="Images held out for validation.")
    seed: int = option(0)
    device: str = option("auto", help="auto|cuda|cuda:N|cpu")
    out: str | None = option(None, help="Run directory (default runs/<store>-<layer>).")
    resume: bool = option(False, help="Continue the run in --out from its trainer_state.pt.")
    overwrite: bool = option(False, help="Replace the run in --out.")
    save_every: int | None = option(None, help="Steps between periodic checkpoints, which a killed run resumes from "
                                    "(default: a quarter of the run, at most 1000; 0: only at the end).")
    warmup_steps: int | None = option(None, help="Linear LR warm-up (default min(1000, steps/10)).")
    decay_frac: float = option(0.2, help="Linear LR decay over this last fraction.")
    grad_clip: float = option(1.0)
    auxk_coeff: float = option(1 / 32)
    dead_rows: int | None = option(None, help="Rows without firing before a latent counts as dead (default: see "
                                   "trainer.default_dead_rows).")
    log_every: int = option(50)
    autocast: str = option("auto", help="auto (bf16 on CUDA)|bf16|off")
    preload: str = option("auto", help="Hold all training rows on the device: auto|yes|no")
    buffer_mb: int = option(2048, help="Streaming: shards per shuffle group, in MB (two groups are in memory: one "
                            "read ahead).")
    prefetch: int = option(4, help="Batches prepared ahead (by the loader thread).")
    stop_at_step: int | None = option(None, help="Save and stop at this step (continue with --resume).")
    export_saelens: bool = option(False, help="Also write <run>/saelens/ (safetensors + cfg.json).")
    export_sparsify: bool = option(False, help="Also write <run>/sparsify/ (sparsify's layout; topk runs).")
    # Variant flags: each variant's Settings.flags says which of these it reads (sae/relu.py, sae/softk.py).
    l1_coeff: float | None = option(None, help="relu: l1 weight (default 5 / d).")
    softk_alpha: float = option(1e-4, help="softk: LapSum temperature, in the reference's units (inputs at "
                                "E||x||^2 = 1; applied as alpha * sqrt(d) to this trainer's E||x||^2 = d inputs).")
    softk_weight: float | None = option(None, help="softk: k-penalty weight (default 1 / variance fraction: the "
                                        "reference's weight 1 in this trainer's loss units). Runs need at least "
                                        "2 x 200 + the hard phase (15%) steps for the k anneal; the mean k then sits "
                                        "about one latent below --k (the penalty on the batch mean keeps pushing): "
                                        "measured 14.5 at k = 16 after 200 steps on image embeddings. Train 1,500 "
                                        "steps or more to compare it with Top-k.")
    progress: bool = option(True, help="No progress bar (as in sae-extract and sae-eval; --no-progress is the "
                             "same).", off=("--quiet", "--no-progress"))
    compile: bool = option(False, help="torch.compile each model's forward (worth it on a GPU: fewer kernel "
                           "launches).")
    threads: int | None = option(None, help="CPU threads for the step (default: torch's; 1 is fastest when other "
                                 "processes share the cores).")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def validate(self) -> None:
        """Checks that need no data; each failure is one line saying what to change."""
        from visionsae.sae.registry import architectures
        known = architectures()
        for a in self.arch:
            if a not in known:
                raise UserError(f"unknown --arch '{a}': choose from {', '.join(known)}")
        for r in self.reg:
            if r not in REGS:
                raise UserError(f"unknown --reg '{r}': choose from {', '.join(REGS)}")
        for r in self.reg_on:
            if r not in REG_ON:
                raise UserError(f"unknown --reg-on '{r}': choose from {', '.join(REG_ON)}")
        if not self.reg_on:
            raise UserError("--reg-on needs at least one value")
        for name, vals in (("beta", self.beta), ("gamma", self.gamma)):
            for v in vals:
                if not (v >= 0 and math.isfinite(v)):
                    raise UserError(f"--{name} must be a finite non-negative number, got {v}")
        for v in self.k:
            if v < 1:
                raise UserError(f"--k must be at least 1, got {v}")
        if not self.arch or not self.k or not self.reg or not self.beta or not self.gamma:
            raise UserError("--arch, --k, --reg, --beta and --gamma each need at least one value")
        for name in ("arch", "k", "reg", "beta", "gamma"):
            vals = list(getattr(self, name))
            twice = sorted({str(v) for v in vals if vals.count(v) > 1})
            if twice:
                raise UserError(f"--{name} lists {', '.join(twice)} more than once: give each value once")
        for name in ("expansion", "lr", "epochs", "val_fraction", "decay_frac", "grad_clip", "auxk_coeff",
                     "l1_coeff", "softk_alpha", "softk_weight"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
        if self.expansion is not None and self.n_latents is not None:
            raise UserError("give either --expansion or --n-latents, not both")
        if self.expansion is not None and not self.expansion > 0:
            raise UserError(f"--expansion must be positive, got {self.expansion}")
        if self.n_latents is not None and self.n_latents < 2:
            raise UserError(f"--n-latents must be at least 2, got {self.n_latents}")
        if self.steps is not None and self.epochs is not None:
            raise UserError("give either --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size >= 1 and (self.steps or 0) * self.batch_size >= MAX_ROWS:
            raise UserError(f"--steps {self.steps} x --batch-size {self.batch_size} rows is beyond what the row "
                            f"counters hold (2^62): at most {MAX_ROWS // self.batch_size - 1} steps")
        if self.epochs is not None and not self.epochs > 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.resume and self.overwrite:
            raise UserError("--resume continues a run and --overwrite replaces it: give one of them")
        for name in ("save_every", "log_every", "buffer_mb", "prefetch", "warmup_steps", "stop_at_step"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise UserError(f"--{name.replace('_', '-')} must be non-negative, got {v}")
        if self.dead_rows is not None and self.dead_rows < 1:
            raise UserError(f"--dead-rows must be at least 1, got {self.dead_rows}")
        if self.n_latents is not None and self.n_latents > MAX_LATENTS:
            raise UserError(f"--n-latents {self.n_latents} is beyond any dictionary this trainer can hold "
                            f"(at most {MAX_LATENTS})")
        if self.grad_clip <= 0 or self.auxk_coeff < 0 or not 0 <= self.decay_frac <= 1:
            raise UserError("--grad-clip must be positive, --auxk-coeff non-negative, --decay-frac in [0, 1]")
        if self.autocast not in ("auto", "bf16", "off") or self.preload not in ("auto", "yes", "no"):
            raise UserError("--autocast takes auto|bf16|off and --preload auto|yes|no")
        if self.l1_coeff is not None and self.l1_coeff < 0 or self.softk_weight is not None and self.softk_weight < 0:
            raise UserError("--l1-coeff and --softk-weight must be non-negative")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if not self.softk_alpha > 0:
            raise UserError(f"--softk-alpha must be positive, got {self.softk_alpha}")

    def check_memory(self, d: int, n: int, n_models: int, device_bytes: int, where: str) -> None:
        """Refuse, before allocating anything, a run whose models and one step's activations cannot fit."""
        need = memory_estimate(d, n, n_models, self.batch_size)
        if need > device_bytes:
            raise UserError(f"{n_models} model(s) of {n} latents x {d} at --batch-size {self.batch_size} need about "
                            f"{_size(need)} ({where} has {_size(device_bytes)}): lower --batch-size, --n-latents or "
                            "--expansion, or train fewer configurations at once")

    def latents_for(self, d: int) -> int:
        if self.n_latents is not None:
            return int(self.n_latents)
        return max(2, int(round((8.0 if self.expansion is None else self.expansion) * d)))


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One model to train: architecture, k and regularizer setting."""

    arch: str
    k: int
    reg: str
    beta: float
    gamma: float
    reg_on: str = "raw"  # what the penalties measure: |z| ("raw") or relu(z) ("relu")

    @property
    def name(self) -> str:
        parts = [self.arch, f"k{self.k}", self.reg]
        if self.reg in ("off", "both"):
            parts.append(f"b{self.beta:g}")
        if self.reg in ("ratio", "both"):
            parts.append(f"g{self.gamma:g}")
        if self.reg != "none" and self.reg_on != "raw":
            parts.append(f"on{self.reg_on}")
        return "-".join(parts)

    @property
    def beta_eff(self) -> float:
        return self.beta if self.reg in ("off", "both") else 0.0

    @property
    def gamma_eff(self) -> float:
        return self.gamma if self.reg in ("ratio", "both") else 0.0


def expand_runs(cfg: TrainConfig) -> list[RunSpec]:
    """Every combination, without duplicates (beta is irrelevant without 'off', gamma without 'ratio')."""
    runs: dict[str, RunSpec] = {}
    for arch in cfg.arch:
        for k in cfg.k:
            for reg in cfg.reg:
                betas = cfg.beta if reg in ("off", "both") else cfg.beta[:1]
                gammas = cfg.gamma if reg in ("ratio", "both") else cfg.gamma[:1]
                ons = cfg.reg_on if reg != "none" else cfg.reg_on[:1]
                for b in betas:
                    for g in gammas:
                        for on in ons:
                            spec = RunSpec(arch, int(k), reg, float(b), float(g), on)
                            runs.setdefault(spec.name, spec)
    return list(runs.values())


def describe_runs(specs: list[RunSpec]) -> str:
    """The progress bar's label: what the pass trains, e.g. 'sae-train 4 runs: topk k16 none|off|ratio|both'."""
    parts = []
    for values in ([s.arch for s in specs], [f"k{s.k}" for s in specs], [s.reg for s in specs]):
        parts.append("|".join(dict.fromkeys(values)))
    return f"sae-train {len(specs)} run{'s' if len(specs) != 1 else ''}: {' '.join(parts)}"


def memory_estimate(d: int, n: int, n_models: int, batch_size: int) -> int:
    """Bytes, roughly: every model's weights with their gradients and two Adam moments (float32), plus one
    step's dense pre-activations and their gradients (batch x latents), plus the batch itself."""
    weights = (2 * n * d + n + d) * 4
    return n_models * 4 * weights + 3 * batch_size * n * 4 + 4 * batch_size * d * 4


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2 ** 10:,.1f} KiB"


def llm_lr(n_latents: int) -> float:
    """The Top-k scaling law (Gao et al. 2024): 2e-4 at 2^14 latents, as 1 / sqrt(n); from LLM-scale runs."""
    return 2e-4 * math.sqrt(2 ** 14 / n_latents)


SHORT_RUN_MULTIPLE = 3.0  # best multiple of llm_lr in runs of 200 and 800 steps (BENCHMARKS.md, lr sweep)
SHORT_RUN_STEPS = 1000  # runs up to this long take the full multiple


def default_lr(n_latents: int, steps: int | None = None) -> float:
    """sae-train's default: llm_lr(n) x clip(3 x 1000 / steps, 1, 3).

    The LLM-scale rule comes from runs of millions of steps; in runs of 200 and 800 steps on real image
    embeddings, 3x it gave the lowest held-out FVU at every width tried (10x: worse, and most latents dead),
    and at 3,200 steps 1x was better than 3x (bench/lr_sweep.py, BENCHMARKS.md). So short runs get 3x,
    runs of 3,000 steps or more the LLM rule, and the multiple falls as 1 / steps in between (an
    interpolation, not measured point by point). ``steps`` None: the LLM rule."""
    if steps is None:
        return llm_lr(n_latents)
    multiple = min(SHORT_RUN_MULTIPLE, max(1.0, SHORT_RUN_MULTIPLE * SHORT_RUN_STEPS / max(steps, 1)))
    return multiple * llm_lr(n_latents)
