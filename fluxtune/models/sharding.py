"""Sharding the frozen base across processes: `train.sharding: fsdp` (torch's FSDP2, `fully_shard`).

    accelerate launch --config_file configs/accelerate/ddp.yaml -m fluxtune.cli train \\
        configs/flux2-dev.yaml train.sharding=fsdp

Each process keeps 1/N of every transformer block's frozen weights and gathers one block at a
time for its forward and again for its backward (then frees it), so a base that does not fit one
GPU fits N of them. The LoRA is not sharded: it is small, so every process keeps all of it and
its gradients are averaged across processes after backward, exactly as data parallel does. That
keeps saving, EMA, resume and every optimizer unchanged, and the LoRA identical on every rank.

Every process must take part in every forward pass (a gather needs all of them), so under
sharding sampling and evaluation run on every process; only the main one writes.
"""

from __future__ import annotations

import logging

import torch

from fluxtune.errors import UserError
from fluxtune.models.offload import repeated_blocks

log = logging.getLogger("fluxtune")


def shard_base(transformer: torch.nn.Module, lora_params: list, device: torch.device) -> None:
    """Shard `transformer` (on the CPU, LoRA attached) in place across the default process group:
    each block is its own gather unit, the root holds the rest (embedders, final norm and
    projection). The shards and the LoRA end up on `device`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kept_whole = set(lora_params)
    for block in repeated_blocks(transformer):
        fully_shard(block, mesh=mesh, ignored_params=kept_whole, reshard_after_forward=True)
    # The root reshards after forward too (torch's default keeps it gathered for the backward that
    # follows): then evaluation and sampling, which have no backward, leave every process in the same
    # state, and the main process alone may read a state dict without the others falling out of step.
    fully_shard(transformer, mesh=mesh, ignored_params=kept_whole, reshard_after_forward=True)
    # fully_shard moves what it shards (and the buffers) to the mesh's device; the rest follows here.
    for p in lora_params:
        p.data = p.data.to(device)


def average_gradients(params: list) -> None:
    """Average the LoRA gradients over all processes, in one collective. A parameter without a
    gradient on this process counts as zero, so every process sends tensors of the same size."""
    import torch.distributed as dist

    world = dist.get_world_size()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g)
        offset += g.numel()


def refuse_accelerate_sharding(accelerator) -> None:
    """fluxtune shards the base itself (train.sharding, this module); accelerate's own
    FSDP, DeepSpeed and Megatron modes wrap the model in ways the recipe does not handle."""
    kind = accelerator.distributed_type.value
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise UserError(f"accelerate is set up for {kind}, which fluxtune does not use: launch with a plain "
                        "multi-process config (configs/accelerate/ddp.yaml) and set train.sharding=fsdp to split "
                        "the base across the GPUs (or model.quantize to shrink it on each)")


def use_sharding(setting: str, processes: int) -> bool:
    """Whether train.sharding splits the base: it needs more than one process."""
    if setting == "none":
        return False
    if processes == 1:
        log.info("train.sharding=%s with one process: nothing to split it over; the base stays whole. Launch "
                 "several processes with accelerate launch to shard it", setting)
        return False
    log.info("train.sharding=%s: the base is split over %d processes", setting, processes)
    return True
