"""One tensor-parallel rank's share of a checkpoint, read straight from the safetensors shards.

The model is built on the meta device, sharded there (`apply_tensor_parallel` slices meta tensors, which costs
nothing), materialised with only this rank's tensors and filled by `load_checkpoint` with the rank's
`ShardLayout`: each sharded tensor is read through `safe_open(...).get_slice`, so only its rows or columns
leave the file (FP8 ones by whole 128-blocks, dequantised, then cut), and tensors other ranks hold (their
routed experts under expert parallelism) are never read. Peak memory per rank is its share of the model plus
one tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from r1forge.config import ModelConfig
from r1forge.model import DeepseekForCausalLM, keep_router_fp32
from r1forge.parallel.tensor_parallel import ShardLayout, apply_tensor_parallel


def load_model_shard(directory: str | os.PathLike, rank: int, size: int, *, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", expert_parallel: bool = False,
                     group: dist.ProcessGroup | None = None, ep_group: dist.ProcessGroup | None = None,
                     keep_lm_head: bool = True) -> tuple[DeepseekForCausalLM, ShardLayout]:
    """Rank `rank` of `size`'s shard of the checkpoint in `directory` (see the module docstring)."""
    from r1forge.checkpoint import load_checkpoint

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    config = ModelConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    model.to(dtype=dtype)
    keep_router_fp32(model)
    layout = apply_tensor_parallel(model, rank, size, group, expert_parallel=expert_parallel, ep_group=ep_group,
                                   keep_lm_head=keep_lm_head)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_checkpoint(model, directory, layout=layout)
    model.eval()
    return model, layout
