"""`parallelize(model, mesh)`: expert parallelism and FSDP2 applied to a single-device model from beside it.

As torchtitan's deepseek_v3 `parallelize.py`: with ep > 1 the routed experts are split over each EP group
(expert_parallel.py) and FSDP-sharded over the ranks that hold the same experts (`mesh.expert_dp`); then every
decoder block (and MTP module) is one `fully_shard` unit over all ranks (`mesh.dp_mesh`), and the root holds
the embedding, the final norm and the head. On CUDA parameters are gathered in bf16 and gradients reduced in
float32; on CPU everything stays float32. The routers are their own float32 units (they decide discrete
choices, as `keep_router_fp32` says for the single-device model).

Gradients are *summed* over ranks (divide factor 1), not averaged: the trainer normalises each rank's loss by
the global target count, so the sum is the gradient of the global batch's loss, the single-process one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from r1forge.model.moe import DeepseekMoE, Router
from r1forge.parallel.expert_parallel import shard_experts
from r1forge.parallel.mesh import ParallelMesh


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [*model.model.layers, *getattr(model.model, "mtp", [])]  # (a dense Qwen2/Llama model has no MTP)


def parallelize(model: nn.Module, mesh: ParallelMesh, bf16: bool = True) -> nn.Module:
    """Shard `model` (a CausalLM, identical on every rank) in place over `mesh`; returns it.

    A 1-process mesh returns the model unchanged. `bf16` selects bf16 parameters / fp32 reduction on CUDA.
    """
    if not mesh.distributed:
        return model
    mesh.config.check_model(getattr(model.config, "n_routed_experts", None))
    model.to(mesh.device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mesh.device.type == "cuda" and bf16 else MixedPrecisionPolicy()
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    if mesh.ep > 1:
        shard_experts(model, mesh.ep_rank, mesh.ep, mesh.ep_group)
    dp_mesh = mesh.dp_mesh
    for block in _blocks(model):
        if isinstance(block.mlp, DeepseekMoE):
            fully_shard(block.mlp.gate, mesh=dp_mesh, mp_policy=fp32)
            if mesh.ep > 1:
                fully_shard(block.mlp.experts, mesh=mesh.expert_dp, mp_policy=mp)
        if hasattr(block, "shared_head"):  # MTP: its head norm runs outside the block's forward (mtp_logits)
            fully_shard(block.shared_head.norm, mesh=dp_mesh, mp_policy=mp)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    # The trainers' entry point besides forward. Not `mtp_logits`: its input (the hidden states) carries a
    # gradient, and FSDP would run the root's post-backward (reduce, reshard) as soon as that gradient arrived,
    # before the main head's and the embedding's backward. Under it the root's parameters are still gathered.
    register_fsdp_forward_method(model, "hidden_states")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
            module.set_reduce_scatter_unused_params(True)  # an expert no token chose still joins the reduction
    return model


def is_parallelized(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def router_modules(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]
