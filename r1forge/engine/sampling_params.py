"""SamplingParams: vLLM's names and meanings, validated at construction so bad input fails at the caller."""

from __future__ import annotations

from dataclasses import dataclass, field


class SamplingParamError(ValueError):
    """An invalid sampling parameter; `param` is its name, for callers (the server) that report it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


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
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "must be an integer >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be an integer >= 0 (0 disables)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "must be an integer >= 1"),
            ("min_tokens", isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             "must be in [0, max_tokens]"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "must be None or an integer in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise SamplingParamError(name, f"SamplingParams.{name} {msg}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
