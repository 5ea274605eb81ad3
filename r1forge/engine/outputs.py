"""What the engine returns: vLLM's RequestOutput / CompletionOutput, and per-step stream deltas."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float] | None  # of each sampled token, when SamplingParams.logprobs is not None
    top_logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    error: str | None = None  # why, when finish_reason is "error" (processing this request raised)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    # The common n == 1 case reads like vLLM's `outputs[0]` fields.
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def logprobs(self) -> list[float] | None:
        return self.outputs[0].logprobs

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass
class StreamDelta:
    """New tokens and text of one completion since the last delta."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # why, when finish_reason is "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
