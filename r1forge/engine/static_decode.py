"""Decode steps at fixed shapes, so that they can be compiled (`torch.compile`) and captured as CUDA graphs.

At small batch a decode step is hundreds of small kernels per layer, and on a GPU launching them costs more
than running them; a CUDA graph replays the whole step with one launch. A graph replays fixed shapes and
fixed addresses with no host round-trip, so the decode step here is built for that:

- the batch is padded to a bucket (1, 2, 4, 8, then multiples of 8); padding rows decode a dummy token whose
  cache row goes to the pool's null block, which no sequence owns;
- block tables are padded to a power-of-two number of blocks, so attention reads at most twice the context
  it needs, and one graph serves every context length of its bucket; graphs are captured on first use, one
  per (batch bucket, block bucket), all in one memory pool;
- the attention metadata is built by tensor ops on the device (`AttentionMetadata.for_decode`) and the MoE
  layers use a graph-safe dispatch (`r1forge.model.moe_static`), with expert-load recording off;
- inputs are copied into static buffers that the graph reads; its output buffer is read before the next step.

Without CUDA graphs the same fixed-shape step is what `torch.compile` compiles (dynamic in batch and context,
so buckets do not recompile), and with neither it runs eagerly: that is how the CPU tests check it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from r1forge.engine.config import EngineConfig
from r1forge.model import AttentionMetadata, CausalLM
from r1forge.model.moe_static import graph_safe_dispatch, stack_expert_weights


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to max_batch (vLLM's capture sizes), max_batch itself included."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


def block_buckets(max_blocks: int) -> list[int]:
    """Powers of two up to max_blocks, and max_blocks itself."""
    sizes, b = [], 1
    while b < max_blocks:
        sizes.append(b)
        b *= 2
    return sizes + [max_blocks]


def _bucket(sizes: list[int], n: int) -> int:
    return next(s for s in sizes if s >= n)


class StaticDecoder:
    """Runs pure-decode steps (one new token per sequence) at bucketed shapes; see the module docstring.

    Args:
        kv_caches: the pool, per layer [blocks, block_size, *token_shape]; its last block, `config.num_blocks`, is the
            null block that padding rows write to.
        config: the resolved `EngineConfig`: buckets up to `max_num_seqs` sequences (at most 256; larger steps
            run eagerly) and `max_model_len / block_size` blocks; `compile` and `cuda_graphs` choose how the
            step runs (`torch.compile`, CUDA-graph capture and replay, or eagerly).
    """

    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], config: EngineConfig) -> None:
        device = kv_caches[0].device
        if config.cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device; the model is on {device}")
        max_batch = min(config.max_num_seqs, 256)
        max_blocks = -(-config.max_model_len // config.block_size)
        compile = config.compile
        self.model = model
        self.device = device
        self.kv_caches = kv_caches
        self.block_size = config.block_size
        self.null_block = config.num_blocks
        self.absorbed = config.absorbed
        self.cuda_graphs = config.cuda_graphs
        self.batch_sizes = batch_buckets(max_batch)
        self.block_counts = block_buckets(max_blocks)
        self.moe_layers = model.moe_layers()
        config = model.config
        dtype = model.model.embed_tokens.weight.dtype
        self.dispatch = None  # a dense model (a distilled student) has no experts to dispatch
        if self.moe_layers:
            dispatch = graph_safe_dispatch(device, dtype, config.hidden_size, config.moe_intermediate_size)
            # Compile around the experts (norms, rope, attention, router): torch.compile traces _grouped_mm in
            # bfloat16 only, and the expert GEMMs are library calls already. A CUDA graph still captures them.
            self.dispatch = torch.compiler.disable(dispatch) if compile else dispatch
        for moe in self.moe_layers:  # once, outside inference mode (a trainer may share these parameters)
            stack_expert_weights(moe.experts)
        B, M = max_batch, max_blocks
        self.input_ids = torch.zeros(B, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(B, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(B, M, dtype=torch.long, device=device)
        self.context_lens = torch.ones(B, dtype=torch.long, device=device)
        self.step_fn = torch.compile(self.forward, dynamic=True) if compile else self.forward
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.num_steps = 0

    def fits(self, num_seqs: int, num_blocks: int) -> bool:
        return num_seqs <= self.batch_sizes[-1] and num_blocks <= self.block_counts[-1]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """The fixed-shape step: [B] tokens -> [B, vocab] float32 logits, latents written to the pool."""
        metadata = AttentionMetadata.for_decode(self.kv_caches, slot_mapping, block_tables, context_lens,
                                                self.block_size, self.absorbed)
        hidden = self.model.model(input_ids, positions, metadata)
        return self.model.lm_head(hidden).float()

    @contextlib.contextmanager
    def _graph_safe_moe(self) -> Iterator[None]:
        saved = [(moe.dispatch, moe.record_load) for moe in self.moe_layers]
        for moe in self.moe_layers:
            moe.dispatch, moe.record_load = self.dispatch, False
        try:
            yield
        finally:
            for moe, (dispatch, record) in zip(self.moe_layers, saved):
                moe.dispatch, moe.record_load = dispatch, record

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Decode one token for each of B sequences; returns [B, vocab] float32 logits.

        `positions[b]` is the new token's position (its context is positions[b] + 1 tokens) and
        `block_tables[b]` must already hold it. With CUDA graphs the result is a view of the graph's output
        buffer: read it before the next step.
        """
        B = len(input_ids)
        Bp = _bucket(self.batch_sizes, B)
        M = _bucket(self.block_counts, max(len(t) for t in block_tables))
        bs = self.block_size
        null = self.null_block
        rows = [table + [null] * (M - len(table)) for table in block_tables] + [[null] * M] * (Bp - B)
        tables = torch.tensor(rows, dtype=torch.long)  # one host tensor, not one per sequence
        pos = torch.zeros(Bp, dtype=torch.long)
        pos[:B] = torch.tensor(positions, dtype=torch.long)
        slots = tables[torch.arange(Bp), pos // bs] * bs + pos % bs  # padding rows: the null block's slot 0
        ids = torch.zeros(Bp, dtype=torch.long)
        ids[:B] = torch.tensor(input_ids, dtype=torch.long)
        args = (self.input_ids[:Bp], self.positions[:Bp], self.slot_mapping[:Bp], self.block_tables[:Bp, :M],
                self.context_lens[:Bp])
        for buffer, host in zip(args, (ids, pos, slots, tables, pos + 1)):
            buffer.copy_(host, non_blocking=True)
        self.num_steps += 1
        with self._graph_safe_moe():
            if self.cuda_graphs:
                logits = self._replay(Bp, M, args)
            else:
                logits = self.step_fn(*args)
        return logits[:B]

    def _replay(self, Bp: int, M: int, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        key = (Bp, M)
        if key not in self.graphs:
            with torch.cuda.device(self.device):
                self.graphs[key] = self._capture(args)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (compilation, lazily created state), then capture. Both write this step's
        latents into the pool: the same values the replay writes again."""
        current = torch.cuda.current_stream()
        stream = torch.cuda.Stream()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step_fn(*args)
        current.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            out = self.step_fn(*args)
        return graph, out
