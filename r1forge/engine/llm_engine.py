"""LLMEngine: requests in, one batched step at a time, stream deltas out.

The engine is synchronous and single-threaded; `LLM` drives it for offline use and `AsyncLLM` runs it on
a background thread for the server. Flow per step: scheduler -> model runner (one forward over every
scheduled sequence) -> forks for n > 1 -> sampler -> stop checks -> deltas.

One request cannot stop the others: an exception while sampling or appending for one request ends that request
with finish_reason "error" (and the message in `error`) and the step goes on for the rest. When the batched
sampler raises, each row is sampled alone to find the request(s) to blame; if no row fails alone, or the
forward itself fails (it depends only on token ids, checked when the request was added), the engine is broken
and `step` raises.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from r1forge.engine.block_manager import BlockManager
from r1forge.engine.detokenizer import Detokenizer
from r1forge.engine.config import EngineConfig
from r1forge.engine.model_runner import ModelRunner, cache_bytes_per_token
from r1forge.engine.outputs import CompletionOutput, RequestOutput, StreamDelta
from r1forge.engine.sampler import sample
from r1forge.engine.sampling_params import SamplingParams
from r1forge.engine.scheduler import ScheduledBatch, Scheduler
from r1forge.engine.sequence import Sequence
from r1forge.engine.speculative import MTPRow, SpeculativeDecoder, Verified, check_speculative_model, \
    mtp_cache_bytes_per_token
from r1forge.model import CausalLM


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    emitted: dict[int, int] = field(default_factory=dict)  # completion index -> chars of text already streamed
    error: str | None = None  # set when processing the request raised; its completions end with "error"

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


class LLMEngine:
    """Args:
        config: the engine's options; resolved here against the model (context length, pool size) and the
            resolved copy, `self.config`, is what the scheduler, runner and static decoder read.
    """

    def __init__(self, model: CausalLM, tokenizer: Any | None, config: EngineConfig | None = None,
                 runner_factory: Callable[[CausalLM, EngineConfig], ModelRunner] = ModelRunner) -> None:
        self.model = model
        self.tokenizer = tokenizer
        device = next(model.parameters()).device
        cache_dtype = model.model.embed_tokens.weight.dtype
        config = config or EngineConfig()
        bytes_per_token = cache_bytes_per_token(model, cache_dtype)
        if config.speculative_config is not None:
            check_speculative_model(model)
            bytes_per_token += mtp_cache_bytes_per_token(model, cache_dtype)
        self.config = config.resolve(model.config.max_position_embeddings, bytes_per_token, device)
        self.max_model_len = self.config.max_model_len
        self.block_manager = BlockManager(self.config.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.runner = runner_factory(model, self.config)  # a multi-process one for tensor_parallel_size > 1
        self.spec = None if self.config.speculative_config is None else \
            SpeculativeDecoder(model, self.config, self.runner, self.block_manager)
        self.requests: dict[str, Request] = {}
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if self.eos_token_id is None:
            self.eos_token_id = model.config.eos_token_id
        self._ids = itertools.count()
        self.num_generated_tokens = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Validate and queue a request. Raises ValueError naming the problem; the engine is left untouched."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is a string but the engine has no tokenizer: pass token ids or a tokenizer")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
            if not all(isinstance(t, int) for t in token_ids):
                raise ValueError("prompt token ids must be integers")
        if not token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        vocab = self.model.config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(token_ids)}..{max(token_ids)}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens, but the model's context is {self.max_model_len}: "
                             f"no room to generate")
        pool_tokens = self.block_manager.num_blocks * self.block_manager.block_size
        if len(token_ids) + 1 > pool_tokens:
            raise ValueError(f"prompt of {len(token_ids)} tokens does not fit the KV-cache pool ({pool_tokens} tokens)")
        params.check_vocab(vocab)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, text, token_ids, params)
        first = Sequence(request_id, 0, token_ids, params, time.monotonic(), self._generator(params, 0))
        first.pending_forks = params.n - 1
        self._attach(first, req)
        self.requests[request_id] = req
        self.scheduler.add(first)
        return request_id

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None:
            return None
        g = torch.Generator(device=self.runner.device)
        g.manual_seed(params.seed + index)
        return g

    def _attach(self, seq: Sequence, req: Request) -> None:
        seq.eos_token_id = self.eos_token_id
        if self.tokenizer is not None:
            seq.detokenizer = Detokenizer(self.tokenizer, req.prompt_token_ids, req.params.skip_special_tokens)
        req.seqs.append(seq)
        req.emitted[seq.index] = 0

    def abort(self, request_id: str) -> list[StreamDelta]:
        """Cancel a request: its unfinished completions (also those not yet forked) finish with reason "abort"
        and their blocks return to the pool now. Returns their final deltas; the request is forgotten."""
        req = self.requests.get(request_id)
        if req is None:
            return []
        deltas = []
        for seq in list(req.seqs):  # _finish may append the siblings still to fork; they are finished already
            if not seq.is_finished:
                deltas += self._finish(seq, "abort", None, [])
        del self.requests[request_id]
        return deltas

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def check_health(self) -> None:
        """Raise the error that stopped the engine's workers, if any (called while idle, e.g. by AsyncLLM)."""
        self.runner.check_health()

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[StreamDelta]:
        """One scheduling round and one forward. Returns a delta for every completion that progressed or ended."""
        batch = self.scheduler.schedule()
        deltas: list[StreamDelta] = []
        if not batch.seqs:
            if self.scheduler.waiting and not self.scheduler.running:
                # The head of the queue cannot fit even in an empty pool: end it rather than spin forever.
                seq = self.scheduler.waiting[0]
                deltas += self._finish(seq, "length", None, [])
            return deltas
        spec = self.spec
        drafted = [s for s in batch.seqs if s.draft_token_ids] if spec else []
        speculate = spec is not None and spec.active(len(self.scheduler.running))
        starts = [s.num_computed_tokens for s in batch.seqs]
        if spec is not None:
            spec.copy_blocks(batch.copies)
        keep_hidden = speculate or bool(drafted)  # the plain call otherwise: what a wrapped runner expects
        seqs, logits = self.runner.execute(batch, keep_hidden=True) if keep_hidden else self.runner.execute(batch)
        hidden = self.runner.last_hidden
        row_of = dict(zip((s.seq_id for s in batch.seqs), itertools.accumulate([0] + batch.num_tokens[:-1])))
        verified: dict[int, Verified] = {}
        if drafted:
            verified = spec.verify(drafted, [row_of[s.seq_id] for s in drafted], hidden)
        for seq in batch.seqs:
            v = verified.get(seq.seq_id)
            self.block_manager.register_computed(seq, None if v is None else seq.token_ids + v.token_ids[:-1])
        if not seqs:
            return deltas
        rows, group = [], []
        forked: list[tuple[Sequence, Sequence]] = []
        for i, seq in enumerate(seqs):
            if seq.seq_id in verified:
                continue
            rows.append(i)
            group.append(seq)
            if seq.pending_forks:
                req = self.requests[seq.request_id]
                for k in range(1, seq.pending_forks + 1):
                    child = seq.fork(k, self._generator(seq.params, k))
                    self.block_manager.fork(seq, child)
                    self._attach(child, req)
                    self.scheduler.running.append(child)
                    rows.append(i)
                    group.append(child)
                    forked.append((seq, child))
                seq.pending_forks = 0
        if group:
            deltas += self._sample(logits[rows], group)
        now = time.monotonic()
        for seq in drafted:
            if seq.is_finished:  # its request failed this step
                continue
            v = verified[seq.seq_id]
            for token, logprob, top in zip(v.token_ids, v.logprobs, v.top_logprobs):
                try:
                    deltas += self._append(seq, token, logprob, top, now)
                except Exception as e:  # detokenizer, stop strings: this request's own state
                    deltas += self.fail(seq.request_id, e)
                if seq.is_finished:  # a stop inside the accepted drafts (or a failure): the rest is never emitted
                    break
        if speculate:
            self._draft(batch, starts, row_of, verified, forked, hidden)
        return deltas

    def _sample(self, logits: torch.Tensor, group: list[Sequence]) -> list[StreamDelta]:
        """Sample and append one token per row; a request whose row raises ends with an error (module docstring).
        Rows sampled again alone after a batch failure may draw differently from an undisturbed batch (the
        failed attempt may have consumed seeded generators); that happens only when a request failed."""
        deltas: list[StreamDelta] = []
        try:
            result = sample(logits, group)
            rows = [(result.token_ids[j], result.logprobs[j], result.top_logprobs[j]) for j in range(len(group))]
        except Exception as batch_error:
            rows = []
            for j, seq in enumerate(group):
                try:
                    one = sample(logits[j : j + 1], [seq])
                    rows.append((one.token_ids[0], one.logprobs[0], one.top_logprobs[0]))
                except Exception as e:
                    rows.append(None)
                    deltas += self.fail(seq.request_id, e)
            if not deltas:  # no request to blame
                raise batch_error
        now = time.monotonic()
        for seq, row in zip(group, rows):
            if row is None or seq.is_finished:  # its request failed this step
                continue
            try:
                deltas += self._append(seq, *row, now)
            except Exception as e:  # detokenizer, stop strings: this request's own state
                deltas += self.fail(seq.request_id, e)
        return deltas

    def fail(self, request_id: str, error: BaseException) -> list[StreamDelta]:
        """End a request because processing it raised: its unfinished completions finish with reason "error" and
        `error` says why; their blocks return to the pool. Unlike `abort`, the request stays until popped."""
        req = self.requests.get(request_id)
        if req is None:
            return []
        req.error = f"{type(error).__name__}: {error}"
        deltas = []
        for seq in list(req.seqs):
            if not seq.is_finished:
                deltas += self._finish(seq, "error", None, [])
        return deltas

    def _draft(self, batch: ScheduledBatch, starts: list[int], row_of: dict[int, int], verified: dict[int, Verified],
               forked: list[tuple[Sequence, Sequence]], hidden: torch.Tensor) -> None:
        """Hand the MTP drafter every position this step computed (and whose next token is now known)."""
        mtp_rows = []
        for seq, start, n in zip(batch.seqs, starts, batch.num_tokens):
            if seq.is_finished or seq.params.uses_penalties:
                continue
            v = verified.get(seq.seq_id)
            count = n if v is None else v.num_accepted + 1  # positions whose latents stayed in the cache
            count = min(count, len(seq) - 1 - start)  # an unfinished prompt chunk knows its next tokens
            if count > 0:
                mtp_rows.append(MTPRow(seq, start, count, row_of[seq.seq_id]))
        for parent, child in forked:
            if not child.is_finished and not child.params.uses_penalties:
                last = len(child) - 2  # the prompt's last position; its next token is the child's first
                mtp_rows.append(MTPRow(child, last, 1, row_of[parent.seq_id] + last - starts[batch.seqs.index(parent)],
                                       fork=True))
        self.spec.draft(mtp_rows, hidden, self.max_model_len)

    def _append(self, seq: Sequence, token: int, logprob: float, top: dict[int, float] | None,
                now: float) -> list[StreamDelta]:
        p = seq.params
        seq.token_ids.append(token)
        self.num_generated_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        if p.logprobs is not None:
            seq.logprobs.append(logprob)
            if p.logprobs:
                seq.top_logprobs.append(top or {})
        if seq.detokenizer is not None:
            seq.output_text += seq.detokenizer.add(token)
        reason, stop_reason = None, None
        if token == seq.eos_token_id and not p.ignore_eos:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif p.stop and seq.detokenizer is not None:
            stop_reason = self._cut_at_stop(seq)
            reason = "stop" if stop_reason is not None else None
        if reason is None and (seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len):
            reason = "length"
        return self._finish(seq, reason, stop_reason, [token]) if reason else [self._delta(seq, [token])]

    def _cut_at_stop(self, seq: Sequence) -> str | None:
        """Find a stop string in the text's tail; cut the text before it (or after, if kept)."""
        longest = max(len(s) for s in seq.params.stop)
        search_from = max(0, self.requests[seq.request_id].emitted[seq.index] - longest)
        best = None
        for stop in seq.params.stop:
            at = seq.output_text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        seq.output_text = seq.output_text[: at + (len(stop) if seq.params.include_stop_str_in_output else 0)]
        return stop

    def _delta(self, seq: Sequence, new_tokens: list[int]) -> StreamDelta:
        req = self.requests[seq.request_id]
        text = seq.output_text
        if not seq.is_finished and seq.params.stop:
            # Hold back text that could still turn out to be the start of a stop string.
            text = text[: max(req.emitted[seq.index], len(text) - (max(len(s) for s in seq.params.stop) - 1))]
        new_text = text[req.emitted[seq.index] :]
        req.emitted[seq.index] += len(new_text)
        n = len(new_tokens)
        return StreamDelta(
            request_id=seq.request_id, index=seq.index, token_ids=new_tokens, text=new_text,
            logprobs=seq.logprobs[-n:] if seq.params.logprobs is not None and n else [],
            top_logprobs=seq.top_logprobs[-n:] if seq.params.logprobs and n else [],
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            error=req.error if seq.finish_reason == "error" else None,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
        )

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None,
                new_tokens: list[int]) -> list[StreamDelta]:
        """End a completion; returns its final delta, and one for each sibling it had still to fork."""
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)
        deltas = [self._delta(seq, new_tokens)]
        if seq.pending_forks:
            # The request ended before its prefill finished (aborted, or the cache cannot hold it): the
            # siblings end the same way, each with its own final delta, so all n completions have a reason.
            req = self.requests[seq.request_id]
            for k in range(1, seq.pending_forks + 1):
                child = seq.fork(k, None)  # FINISHED like seq, holding no blocks
                child.finish_reason = reason
                self._attach(child, req)
                deltas.append(self._delta(child, []))
            seq.pending_forks = 0
        return deltas

    # ------------------------------------------------------------------ results
    def request_output(self, request_id: str) -> RequestOutput:
        req = self.requests[request_id]
        outs = []
        for seq in sorted(req.seqs, key=lambda s: s.index):
            lp = seq.params.logprobs is not None
            outs.append(CompletionOutput(
                index=seq.index, token_ids=seq.output_token_ids, text=seq.output_text,
                logprobs=list(seq.logprobs) if lp else None,
                top_logprobs=list(seq.top_logprobs) if lp and seq.params.logprobs else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                error=req.error if seq.finish_reason == "error" else None,
            ))
        cached = req.seqs[0].num_cached_prompt_tokens if req.seqs else 0
        return RequestOutput(request_id, req.prompt, req.prompt_token_ids, outs, req.finished, cached)

    def pop_finished(self, request_id: str) -> RequestOutput:
        out = self.request_output(request_id)
        del self.requests[request_id]
        return out

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        static = self.runner.static
        fixed_shape = {} if static is None else {"static_decode_steps": static.num_steps,
                                                 "cuda_graphs_captured": len(static.graphs)}
        return fixed_shape | {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "cache_blocks_used": bm.num_used_blocks,
            "cache_blocks_total": bm.num_blocks,
            "cache_usage": bm.num_used_blocks / bm.num_blocks,
            "prefix_hit_tokens": bm.prefix_hit_tokens,
            "prefill_tokens": self.runner.num_prefill_tokens,
            "forward_tokens": self.runner.num_forward_tokens,
            "generated_tokens": self.num_generated_tokens,
            "preemptions": self.scheduler.num_preemptions,
        } | ({} if self.spec is None else self.spec.stats())
