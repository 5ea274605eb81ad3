"""An unsharded copy of a parallelized model's weights on every rank: what a rollout engine reads after an update.

Dense parameters are FSDP DTensors (`full_tensor()` all-gathers each); routed experts also live on their EP rank
only, so each EP group all-gathers its experts' (already unsharded) tensors. The result has the single-device
model's keys, so `engine_model.load_state_dict(gather_full_state_dict(model, mesh))` is the weight sync, and
`unsharded_copy(model, mesh)` a new single-device model holding them (distillation evaluates its student so).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from r1forge.model.factory import new_model
from r1forge.model.moe import DeepseekMoE
from r1forge.parallel.expert_parallel import LocalExperts
from r1forge.parallel.mesh import ParallelMesh


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, mesh: ParallelMesh) -> dict[str, torch.Tensor]:
    """The whole model's parameters and persistent buffers, unsharded, on every rank (a collective)."""
    full = {}
    for name, t in model.state_dict().items():
        full[name] = t.full_tensor() if isinstance(t, DTensor) else t
    if mesh.ep == 1:
        return full
    for prefix, layer in model.named_modules():
        if not isinstance(layer, DeepseekMoE) or not isinstance(layer.experts, LocalExperts):
            continue
        local = layer.experts
        for j in range(local.count):  # expert j of every EP rank at once
            for pname, p in local[local.first + j].named_parameters():
                p = p.full_tensor() if isinstance(p, DTensor) else p
                gathered = [torch.empty_like(p) for _ in range(mesh.ep)]
                dist.all_gather(gathered, p.contiguous(), group=mesh.ep_group)
                for r, value in enumerate(gathered):
                    full[f"{prefix}.experts.{r * local.count + j}.{pname}"] = value
    return full


def unsharded_copy(model: nn.Module, mesh: ParallelMesh) -> nn.Module:
    """A plain single-device model with a parallelized model's current weights, on every rank (a collective):
    what an engine samples from once the training is sharded (`LLM` needs whole tensors). Same dtypes as the
    training parameters."""
    full = gather_full_state_dict(model, mesh)
    copy = new_model(model.config, with_mtp=model.num_mtp > 0)
    copy.load_state_dict(full)
    return copy.to(mesh.device).eval()
