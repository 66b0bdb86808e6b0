"""One implementation's Top-k SAE training step, timed against one encoder matmul in the same process.

Run by `bench/peers.py` (not by hand), once per implementation, with that implementation's interpreter:
visionsae with the project's, each peer with the python of its own virtual environment (so this file
imports nothing from visionsae at module level). It builds the model and the step, runs two warm-up
steps, prints `@@READY`, then answers each `time` line on stdin with one `@@RESULT {json}` line: the best CPU time
(time.process_time) and wall time of `--reps` encoder matmuls and of `--reps` steps. Other output (peers
print banners at import) is ignored by the parent, which only reads the `@@` lines.

Each `build_*` returns a no-argument function that performs ONE training step the way that library's own
trainer performs it on the fixed batch x_BD, with the trainer's defaults: its loss (AuxK included where the
trainer enables it by default; with a fresh model no latent is dead yet, so every trainer here skips the AuxK
pass exactly as it does early in a real run), backward, its decoder-gradient projection / normalisation, its
clipping, its optimiser step, and its dead-latent bookkeeping. Peer code is called, never copied.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import sys
import time


def build_visionsae(x_BD, d: int, n: int, k: int, device: str = "cpu"):
    # The same step `sae-train` runs: Run.train_step (forward through the fused encoder + Top-k, AuxK term
    # skipped while no latent can be dead, backward, decoder-gradient projection, clipping, fused Adam,
    # renormalisation, firing counters), with the trainer's defaults (auxk 1/32, grad clip 1, 10M dead rows).
    from visionsae.sae import SAEConfig, build_sae
    from visionsae.train.config import RunSpec, TrainConfig, default_lr
    from visionsae.train.trainer import MAX_DEAD_ROWS
    from visionsae.train.training_run import Run

    defaults = TrainConfig.__dataclass_fields__
    import torch
    model = build_sae(SAEConfig("topk", d, n, k)).to(device)
    run = Run(RunSpec("topk", k, "none", 0.0, 0.0), model, lr=default_lr(n), variance=float(d),
              dead_rows=MAX_DEAD_ROWS, auxk_coeff=defaults["auxk_coeff"].default,
              grad_clip=defaults["grad_clip"].default, world=1,
              autocast_dtype=torch.bfloat16 if device == "cuda" else None)  # sae-train's default on CUDA
    steps = iter(range(1 << 30))
    return lambda: run.train_step(x_BD, next(steps), 1 << 30, 1.0), model


def build_sparsify(x_BD, d: int, n: int, k: int, device: str = "cpu"):
    # EleutherAI sparsify (eai-sparsify): the per-hookpoint body of Trainer.fit's forward hook plus the
    # optimiser part of its loop, with TrainConfig defaults: optimizer "signum" (ScheduleFreeWrapper around
    # SignSGD, lr 5e-3 / sqrt(n / 2^14)), auxk_alpha 0 (so dead_mask is None), no multi-topk.
    import torch
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device, dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (n / 2 ** 14) ** 0.5)]),
                              momentum=0.95)
    opt.train()
    since_fired_N = torch.zeros(n, dtype=torch.long, device=device)
    sae.b_dec.data = x_BD.mean(0)  # the trainer's first-step decoder-bias init (step 0 only)

    def step():
        did_fire_N = torch.zeros(n, dtype=torch.bool, device=device)
        sae.set_decoder_norm_to_unit_norm()  # the hook keeps W_dec unit-norm before every forward
        total_variance = (x_BD - x_BD.mean(0)).pow(2).sum()
        # On CUDA the trainer runs the forward under bf16 autocast (its default), with its Triton decoder.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            out = sae(x=x_BD, y=x_BD, dead_mask=None, total_variance=total_variance)
        did_fire_N[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # the trainer's avg_fvu metric: a host read every step
        loss = out.fvu + 0.0 * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired_N.add_(x_BD.shape[0])
        since_fired_N[did_fire_N] = 0
    return step, sae


def build_saelens(x_BD, d: int, n: int, k: int):
    # SAELens: TopKTrainingSAE (defaults: AuxK coefficient 1, activations rescaled by decoder norm, dense
    # activations) driven by SAETrainer.step, the seam its fit() loop calls every step (training forward with
    # the dead-neuron mask, firing statistics, backward, clip 1.0, Adam, LR and coefficient schedulers).
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, device="cpu"))
    B = x_BD.shape[0]
    lr = 3e-4  # the runner config's default; lr_end is set as its __post_init__ sets it (lr / 10)
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=B << 30, train_batch_size_samples=B, lr=lr,
                                          lr_end=lr / 10, device="cpu"), sae, data_provider=iter(()))

    def step():  # the body of SAETrainer.fit's loop, less wandb, checkpoints and the progress bar
        trainer.maybe_reset_sparsity()
        trainer.step(x_BD)
        trainer.n_training_steps += 1
    return step, sae


def build_overcomplete(x_BD, d: int, n: int, k: int):
    # overcomplete: TopKSAE (default linear encoder, l2-normalised dictionary) trained by its own train_sae
    # loop over a one-batch "dataloader" (zero_grad, forward, criterion, dead-code tracker, backward, clip 1.0,
    # optimiser step). Criterion and optimiser are the README's (plain MSE, Adam 5e-4); the library leaves
    # them to the user and does not add AuxK unless asked (top_k_auxiliary_loss). monitoring=0: no per-step
    # metrics or printing (its default 1 would add them).
    import torch
    from overcomplete.sae import TopKSAE, train_sae

    sae = TopKSAE(d, nb_concepts=n, top_k=k, device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=5e-4)

    def criterion(x, x_hat, pre_codes, codes, dictionary):
        return (x - x_hat).square().mean()
    return lambda: train_sae(sae, [x_BD], criterion, opt, nb_epochs=1, clip_grad=1.0, monitoring=0,
                             device="cpu"), sae


def build_dictionary_learning(x_BD, d: int, n: int, k: int):
    # dictionary_learning: TopKTrainer.update(step, x), the whole step (loss with AuxK alpha 1/32, firing
    # counters, backward, decoder-gradient projection, clip 1.0, Adam, LR schedule, decoder renormalisation).
    # Step 0 also initialises b_dec to the geometric median; the warm-up takes it.
    from dictionary_learning.trainers.top_k import TopKTrainer

    trainer = TopKTrainer(steps=1 << 30, activation_dim=d, dict_size=n, k=k, layer=0, lm_name="bench",
                          device="cpu")
    steps = iter(range(1 << 30))
    return lambda: trainer.update(next(steps), x_BD), trainer.ae


# The distribution each implementation is installed as (its version goes into the report).
DISTRIBUTIONS = {"visionsae": "visionsae", "sparsify": "eai-sparsify", "saelens": "sae-lens",
                 "overcomplete": "overcomplete", "dictionary_learning": "dictionary-learning"}
CUDA_IMPLS = ("visionsae", "sparsify")  # the GPU side-by-side of issue 12; the others are timed on the CPU only
BUILDERS = {"visionsae": build_visionsae, "sparsify": build_sparsify, "saelens": build_saelens,
            "overcomplete": build_overcomplete, "dictionary_learning": build_dictionary_learning}


def _best(fn, reps: int, sync=lambda: None) -> tuple[float, float]:
    """Best CPU and wall seconds of ``reps`` calls (on CUDA, wall time up to the device's completion)."""
    cpu = wall = float("inf")
    for _ in range(reps):
        sync()
        c, w = time.process_time(), time.perf_counter()
        fn()
        sync()
        cpu, wall = min(cpu, time.process_time() - c), min(wall, time.perf_counter() - w)
    return cpu, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("impl", choices=sorted(BUILDERS))
    ap.add_argument("--d", type=int, required=True)
    ap.add_argument("--n-latents", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()
    if args.device == "cuda" and args.impl not in CUDA_IMPLS:
        sys.exit(f"{args.impl}: timed on the CPU only in this bench (CUDA: {', '.join(CUDA_IMPLS)})")
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x_BD = torch.randn(args.batch, args.d)  # the same batch in every process: same seed, same torch
    W_ND = torch.randn(args.n_latents, args.d) / args.d ** 0.5
    cuda = args.device == "cuda"
    x_BD, W_ND = x_BD.to(args.device), W_ND.to(args.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step, module = BUILDERS[args.impl](x_BD, args.d, args.n_latents, args.k, args.device)

    def matmul():  # the limit: x @ W_enc^T, B x d x n, once (bf16 on CUDA, as both steps run their encoder)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            F.linear(x_BD, W_ND)
    before = [p.detach().clone() for p in module.parameters()]
    # Two warm-up steps; they must train, or the timing would be of a step that does nothing (two, because
    # dictionary_learning's LR warm-up starts at 0: its step 0 moves only b_dec and the renormalised decoder).
    step()
    step()
    moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, module.parameters()))
    if moved == 0:
        sys.exit(f"{args.impl}: the warm-up steps changed no parameter")
    del before
    matmul()
    info = {"version": importlib.metadata.version(DISTRIBUTIONS[args.impl]), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "params_updated": f"{moved}/{len(list(module.parameters()))}"}
    print("@@READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "time":
            break
        matmul_cpu, matmul_wall = _best(matmul, args.reps, sync)
        step_cpu, step_wall = _best(step, args.reps, sync)
        print("@@RESULT " + json.dumps({
            "matmul_cpu_s": matmul_cpu, "matmul_wall_s": matmul_wall, "step_cpu_s": step_cpu,
            "step_wall_s": step_wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load1": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
