"""Data parallelism under torchrun: process group setup and the gradient all-reduce.

Each rank computes gradients of its local batch mean; averaging them over ranks gives the gradient of
the global batch mean (batch sizes are equal by construction). Gradients are all-reduced explicitly,
one flat buffer per model, instead of through the DistributedDataParallel wrapper: several models
train on each batch, and the SoftSAE k-estimator has no gradient in its hard phase, both of which the
wrapper handles only with find_unused_parameters and per-model process-group bookkeeping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup(device_kind: str) -> Dist:
    """Join the process group torchrun describes in the environment; a plain run is world 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(model: nn.Module, world: int) -> None:
    """Average .grad over ranks. Which parameters have a gradient is decided by the graph, the same on
    every rank; parameters without one keep None (the optimiser then skips them, as in one process)."""
    if world <= 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
