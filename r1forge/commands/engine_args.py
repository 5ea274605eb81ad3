"""Engine options shared by the commands that generate (generate, chat, serve)."""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                   help='speculative decoding with the model\'s MTP module, e.g. '
                        '\'{"method": "mtp", "num_speculative_tokens": 2}\' (vLLM\'s spelling)')


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--speculative-config is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--speculative-config must be a JSON object, got {text!r}")
    return value


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `LLM` keyword arguments that `add_engine_arguments` parsed."""
    return dict(device=args.device, cuda_graphs=args.cuda_graphs, compile=args.compile,
                speculative_config=args.speculative_config, tensor_parallel_size=args.tensor_parallel_size,
                enable_expert_parallel=args.enable_expert_parallel)
