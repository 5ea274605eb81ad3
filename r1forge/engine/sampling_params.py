"""SamplingParams: vLLM's names and meanings, validated at construction so bad input fails at the caller.

Every numeric field is bounded here, once, for the library and the server alike: finite, of the right type (a
bool is not a number, a string is not a number), and within what the sampler's tensors hold (top_k and seeds
are int64 there, temperatures and penalties float32, and a temperature or a repetition penalty near zero would
divide the logits into infinities). The bounds that need the model, `top_k`, `logprobs` and `stop_token_ids`
against the vocabulary, are checked by `check_vocab`, which the engine calls when it takes the request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

MAX_N = 4096  # completions per prompt
MAX_TOKENS = 2**31 - 1  # completion tokens (the engine also stops at its context length)
MAX_TOP_K = 2**31 - 1  # before the vocabulary check; int64 in the sampler
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0  # a nonzero temperature below this overflows the scaled logits
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 100.0  # divides and multiplies the logits
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64  # every one is searched for after every token: their number is a per-token cost
MAX_STOP_CHARS = 4096  # total length of the stop strings
MAX_STOP_TOKEN_IDS = 1024
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as OpenAI's `seed`


class SamplingParamError(ValueError):
    """An invalid sampling parameter; `param` is its name, for callers (the server) that report it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool); ints too large for a float are refused by the range checks."""
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


@dataclass
class SamplingParams:
    """How to sample one request's completions.

    `logprobs=None` returns no logprobs; `logprobs=0` the sampled tokens' logprobs (what GRPO needs); `k > 0`
    also the k most likely tokens at each step. Logprobs are of the model's distribution at `temperature`
    (raw when greedy), before top-k/top-p/min-p and penalties: the quantity a trainer recomputes.
    """

    n: int = 1  # completions per prompt; they share the prompt's prefill and cache blocks
    temperature: float = 1.0  # 0 means greedy (deterministic)
    top_p: float = 1.0  # nucleus sampling mass, (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    min_p: float = 0.0  # drop tokens below min_p * p(most likely); 0 disables
    repetition_penalty: float = 1.0  # transformers-style, over prompt and output tokens; 1 disables
    presence_penalty: float = 0.0  # OpenAI-style, subtracted once per token present in the output
    frequency_penalty: float = 0.0  # OpenAI-style, subtracted per occurrence in the output
    seed: int | None = None  # per-request seed: the same seed gives the same samples whatever the batch
    max_tokens: int = 16  # completion tokens at most
    min_tokens: int = 0  # eos / stop token ids suppressed until this many tokens
    stop: list[str] = field(default_factory=list)  # stop strings; the text is cut before them
    stop_token_ids: list[int] = field(default_factory=list)  # extra token ids that end a completion
    ignore_eos: bool = False  # keep going past the eos token
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text
    logprobs: int | None = None  # see class docstring
    skip_special_tokens: bool = True  # when detokenising

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None or isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop or [])
        if self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise SamplingParamError naming the first field out of bounds (see the module docstring)."""
        t, rp = self.temperature, self.repetition_penalty
        checks: list[tuple[str, Callable[[], bool], str]] = [  # lazy: each assumes the ones before
            ("n", lambda: _is_int(self.n) and 1 <= self.n <= MAX_N, f"must be an integer in [1, {MAX_N}]"),
            ("temperature", lambda: _is_number(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE),
             f"must be 0 (greedy) or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]"),
            ("top_p", lambda: _is_number(self.top_p) and 0 < self.top_p <= 1, "must be a number in (0, 1]"),
            ("top_k", lambda: _is_int(self.top_k) and 0 <= self.top_k <= MAX_TOP_K,
             "must be an integer >= 0 (0 disables) and at most the vocabulary size"),
            ("min_p", lambda: _is_number(self.min_p) and 0 <= self.min_p <= 1, "must be a number in [0, 1]"),
            ("repetition_penalty",
             lambda: _is_number(rp) and MIN_REPETITION_PENALTY <= rp <= MAX_REPETITION_PENALTY,
             f"must be a number in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}] (1 disables)"),
            ("presence_penalty", lambda: _is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "must be a number in [-2, 2]"),
            ("frequency_penalty", lambda: _is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "must be a number in [-2, 2]"),
            ("seed", lambda: self.seed is None or (_is_int(self.seed)
                                                   and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
             "must be None or an integer in the int64 range"),
            ("max_tokens", lambda: _is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_TOKENS,
             f"must be an integer in [1, {MAX_TOKENS}]"),
            ("min_tokens", lambda: _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
             "must be an integer in [0, max_tokens]"),
            ("stop", lambda: isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
             "must be a list of non-empty strings"),
            ("stop", lambda: len(self.stop) <= MAX_STOP_STRINGS, f"may hold at most {MAX_STOP_STRINGS} strings"),
            ("stop", lambda: sum(len(s) for s in self.stop) <= MAX_STOP_CHARS,
             f"may total at most {MAX_STOP_CHARS} characters"),
            ("stop_token_ids", lambda: isinstance(self.stop_token_ids, list)
             and all(_is_int(i) and 0 <= i < 2**31 for i in self.stop_token_ids)
             and len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
             f"must be a list of at most {MAX_STOP_TOKEN_IDS} token ids (integers >= 0)"),
            ("ignore_eos", lambda: isinstance(self.ignore_eos, bool), "must be a bool"),
            ("include_stop_str_in_output", lambda: isinstance(self.include_stop_str_in_output, bool),
             "must be a bool"),
            ("logprobs",
             lambda: self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"must be None or an integer in [0, {MAX_LOGPROBS}]"),
            ("skip_special_tokens", lambda: isinstance(self.skip_special_tokens, bool), "must be a bool"),
        ]
        for name, ok, msg in checks:
            if not ok():
                raise SamplingParamError(name, f"SamplingParams.{name} {msg}, got {_short(getattr(self, name))}")

    def check_vocab(self, vocab_size: int) -> None:
        """The bounds that need the model (called by the engine when it takes the request); re-runs `validate`,
        since a dataclass can be changed after construction."""
        self.validate()
        if self.top_k > vocab_size:
            raise SamplingParamError("top_k", f"SamplingParams.top_k must be at most the vocabulary size "
                                              f"{vocab_size} (0 disables), got {self.top_k}")
        if self.logprobs is not None and self.logprobs > vocab_size:
            raise SamplingParamError("logprobs", f"SamplingParams.logprobs must be at most the vocabulary size "
                                                 f"{vocab_size}, got {self.logprobs}")
        bad = [i for i in self.stop_token_ids if i >= vocab_size]
        if bad:
            raise SamplingParamError("stop_token_ids", f"SamplingParams.stop_token_ids must be in [0, {vocab_size}),"
                                                       f" got {bad[:5]}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
