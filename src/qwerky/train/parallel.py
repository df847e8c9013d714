"""Scale-out on PyTorch's own engine: torchrun + FSDP2 (`fully_shard`), applied by functions.

The model code is single-device; `init_distributed` reads torchrun's environment and `shard_teacher` /
`shard_student` apply `fully_shard` unit by unit (mixers get their own unit so stage 1 can call them
directly). NCCL on CUDA, gloo on CPU (so a 2-process test runs anywhere).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    forced: bool = False  # QWERKY_FSDP=1: the sharded path on one process (to check it on a single GPU)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.forced

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def fsdp_recomputes_chunked_head() -> bool:
    """Whether FSDP2 here can recompute the sharded head inside the chunked loss's checkpoint: torch 2.13
    supports a grouped unit whose head is called per chunk; on torch 2.11 an H100 run failed there
    (docs/gpu.md), so older versions keep the chunks' logits instead (and are warned about)."""
    return torch.__version__ >= (2, 13)


def init_distributed(device: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun; pick the device.

    `QWERKY_FSDP=1` under torchrun takes the FSDP2 path even with one process: NCCL refuses two ranks on
    one GPU, so this is how a single-GPU machine checks the sharded code (process group, fully_shard,
    mixed precision, sharded checkpoints) end to end."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    forced = os.environ.get("QWERKY_FSDP", "") == "1" and "RANK" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if (world > 1 or forced) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev, forced=forced and world == 1)


def _shard_units(base: nn.Module, layers: nn.ModuleList, embed: nn.Module, head: nn.Module,
                 extra_units: list[nn.Module], mp_policy: object | None, reshard: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    kwargs = {"reshard_after_forward": reshard}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for m in extra_units:
        fully_shard(m, **kwargs)
    for layer in layers:
        fully_shard(layer, **kwargs)
    if head.weight is embed.weight:  # tied: one unit holds the shared weight
        fully_shard([embed, head], **kwargs)
    else:
        fully_shard(embed, **kwargs)
        fully_shard(head, **kwargs)
    fully_shard(base, **kwargs)


def shard_teacher(teacher: nn.Module, layers: nn.ModuleList, reshard: bool = True) -> None:
    """FSDP2 units: each decoder layer, the embedding/head, then the base model (its norm)."""
    base = getattr(teacher, teacher.base_model_prefix)
    _shard_units(base, layers, teacher.get_input_embeddings(), teacher.get_output_embeddings(), [], None, reshard)


def shard_student(student: nn.Module, layers: nn.ModuleList, bf16: bool = False, reshard: bool = True) -> None:
    """FSDP2 units: each mixer (stage 1 calls them directly), each decoder layer, embedding/head, base model.

    Every unit is called through its own forward (the loss code calls the base model and the head
    separately), so each one gathers its parameters when used and reduce-scatters its gradients.
    """
    policy = None
    if bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    _shard_units(student.model, layers, student.get_input_embeddings(), student.lm_head, list(student.mixers),
                 policy, reshard)


def apply_fsdp(student: nn.Module, teacher: nn.Module, info: DistInfo, precision: str) -> None:
    """Shard teacher and student over the process group (FSDP2), in place; the student must own its weights
    (`unshare_from_teacher`) first. On CUDA the student keeps fp32 master weights and computes in bf16
    (unless precision is fp32)."""
    from qwerky.modeling.modeling_qwerky import find_decoder_layers

    t_layers = find_decoder_layers(getattr(teacher, teacher.base_model_prefix), teacher.config.num_hidden_layers)
    if info.device.type == "cuda":
        student.float()
    shard_teacher(teacher, t_layers)
    shard_student(student, find_decoder_layers(student.model, student.config.num_hidden_layers),
                  bf16=info.device.type == "cuda" and precision != "fp32")
    if info.device.type == "cuda" and not fsdp_recomputes_chunked_head():
        log.warning("FSDP2 on CUDA with torch %s is untested: on torch 2.11 an earlier version of this path "
                    "failed on an H100 (docs/gpu.md); qwerky pins torch 2.13", torch.__version__)
    log.info("FSDP2: teacher and student sharded over %d process(es) (%s)%s", info.world_size,
             "nccl" if info.device.type == "cuda" else "gloo", ", forced by QWERKY_FSDP=1" if info.forced else "")


def apply_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each decoder layer of `model` (an HF base model) in its backward, or stop doing so; the one
    place that switches it (the choice is per stage: pipeline's `layer_checkpointing`). Transformers 5 names it
    activation checkpointing; older versions, gradient checkpointing."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager | None:
    """The autocast context of a training step: bf16 when asked, or on CUDA by default; None: fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return None


def main_first(info: DistInfo, fn: Callable[[], T]) -> T:
    """`fn()` on rank 0, then on the other ranks: for work whose result rank 0 leaves on disk (the token cache),
    so the others only read it."""
    result = fn() if info.is_main else None
    barrier(info)
    return result if info.is_main else fn()  # type: ignore[return-value]


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def from_rank0(value: T, info: DistInfo) -> T:
    """Rank 0's value on every rank: a decision that changes the weights or the sequence length (the stage
    guard's, the teacher-context cap) must be taken the same way everywhere, even if the ranks' numbers were
    to differ in the last bit."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reshard(*models: nn.Module) -> None:
    """Put every FSDP2 unit back to its shards. A no-grad forward (held-out evaluation) leaves the root
    unit's weights gathered, and the next training step's backward then crashed (SIGSEGV, torch 2.13, gloo)."""
    from torch.distributed.fsdp import FSDPModule

    for model in models:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
