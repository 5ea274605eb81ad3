"""Engine options shared by the commands that generate (generate, chat, serve)."""

from __future__ import annotations

import argparse
from typing import Any


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture decode steps as CUDA graphs (CUDA only; padded batch and context buckets)")
    p.add_argument("--compile", action="store_true", help="run decode steps through torch.compile")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over N processes (GPUs cuda:0..N-1, or CPU with gloo); the engine starts "
                        "the workers itself")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size: split the routed experts over the ranks")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `LLM` keyword arguments that `add_engine_arguments` parsed."""
    return dict(device=args.device, cuda_graphs=args.cuda_graphs, compile=args.compile,
                tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel)
