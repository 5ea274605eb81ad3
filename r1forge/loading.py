"""`load_model`: config.json + safetensors directory -> a model (DeepSeek or dense), without a second copy in memory."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from r1forge.accounting import check_model_fits
from r1forge.auto_config import load_config
from r1forge.model import CausalLM, keep_router_fp32, new_model


def load_model(directory: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               with_mtp: bool = False, strict: bool = True, verify: str | None = None) -> CausalLM:
    """Load a Hugging Face-layout checkpoint (bf16, fp32 or FP8 block-quantised): DeepSeek-V2/V3/R1, or a dense
    Qwen2 / Llama student (R1-Distill); `model_type` in config.json decides which.

    The model is built on the meta device and materialised once on `device`, then each tensor is streamed from
    its shard straight into place, so peak memory is about the model's size. `verify` ("size" by default,
    "full", "none"; see r1forge.checkpoint.manifest) checks every file `checksums.json` lists, config.json
    included, before any is read.
    """
    from r1forge.checkpoint import load_checkpoint
    from r1forge.checkpoint.manifest import verify_checkpoint

    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"model directory not found: {directory}")
    verify_checkpoint(directory if directory.is_dir() else directory.parent, verify)
    config = load_config(directory)
    check_model_fits(config, device, dtype, include_mtp=with_mtp, what=f"the model of {directory}")
    with torch.device("meta"):
        model = new_model(config, with_mtp=with_mtp)
    model.to(dtype=dtype)
    keep_router_fp32(model)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_checkpoint(model, directory, strict=strict, verify="none")  # verified above
    model.eval()
    return model
