"""The response side of `r1forge serve`: one choice's state as its deltas arrive, for both endpoints.

`ChatChoiceState` splits the `<think>` block into `reasoning_content` (also when the template already opened it),
parses DeepSeek-V3 tool calls into `tool_calls` and counts reasoning tokens; `TextChoiceState` is the legacy
completion's text and parallel-list logprobs. Both give the stream's chunks per delta and the complete choice.
`TokenText` is a token's text and raw bytes, for logprobs.
"""

from __future__ import annotations

from typing import Any

from r1forge.data.tokenizer import UNICODE_TO_BYTE
from r1forge.engine.outputs import StreamDelta
from r1forge.serve.protocol import (
    ChatChoice, ChatChunkChoice, ChatResponseMessage, ChoiceLogprobs, CompletionChoice, CompletionLogprobs,
    DeltaMessage, DeltaToolCall, ResponseToolCall, TokenLogprob, TopLogprob,
)
from r1forge.serve.reasoning import ReasoningStreamParser
from r1forge.serve.tool_calls import ToolCallDelta, ToolCallStreamParser, parse_tool_calls


class TokenText:
    """Text and raw UTF-8 bytes of single tokens, for logprobs. A token that is part of a character decodes to
    U+FFFD, so its bytes come from the byte-level spelling, as OpenAI's `bytes` field intends."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.byte_level = bool(getattr(tokenizer, "byte_level", False))
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.tokenizer.decode([token_id])
            raw = text.encode("utf-8")
            piece = self.tokenizer.id_to_token(token_id) if self.byte_level else None
            if piece and all(c in UNICODE_TO_BYTE for c in piece):
                raw = bytes(UNICODE_TO_BYTE[c] for c in piece)
            hit = self._cache[token_id] = (text, list(raw))
        return hit

    def chat_logprobs(self, delta: StreamDelta) -> list[TokenLogprob]:
        out = []
        for j, (token_id, logprob) in enumerate(zip(delta.token_ids, delta.logprobs)):
            text, raw = self(token_id)
            tops = delta.top_logprobs[j] if j < len(delta.top_logprobs) else {}
            out.append(TokenLogprob(token=text, logprob=logprob, bytes=raw, top_logprobs=[
                TopLogprob(token=self(t)[0], logprob=lp, bytes=self(t)[1]) for t, lp in tops.items()]))
        return out


def _merge_tool_deltas(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Join consecutive argument pieces of the same call (feed's and finish's output in one chunk)."""
    out: list[ToolCallDelta] = []
    for d in deltas:
        if out and out[-1].index == d.index and d.id is None:
            out[-1].arguments += d.arguments
        else:
            out.append(d)
    return out


class ChatChoiceState:
    """One chat completion as it is generated: reasoning split, tool calls, token counts, logprobs.

    Streaming parses tool calls incrementally (ToolCallStreamParser); a complete response parses the whole
    content once (parse_tool_calls), so a malformed call comes back as text rather than as a broken call.
    """

    def __init__(self, index: int, prompt_opened_think: bool, tools: bool, stream: bool,
                 token_text: TokenText | None) -> None:
        self.index = index
        self.reasoning = ReasoningStreamParser(prompt_opened_think)
        self.tools = tools
        self.tool_parser = ToolCallStreamParser() if tools and stream else None
        self.token_text = token_text
        self.reasoning_parts: list[str] = []
        self.content_parts: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.num_tokens = self.num_reasoning_tokens = 0
        self.finish_reason: str | None = None

    def feed(self, delta: StreamDelta) -> tuple[str, str, list[ToolCallDelta], list[TokenLogprob]]:
        """(reasoning, content, tool call deltas, logprobs) that this delta settles."""
        finishing = delta.finish_reason is not None
        was_reasoning = self.reasoning.in_reasoning
        reasoning, content = self.reasoning.feed(delta.text)
        if finishing:
            r, c = self.reasoning.finish()
            reasoning, content = reasoning + r, content + c
        if was_reasoning or self.reasoning.in_reasoning:  # the </think> token counts as reasoning
            self.num_reasoning_tokens += len(delta.token_ids)
        self.num_tokens += len(delta.token_ids)
        calls: list[ToolCallDelta] = []
        if self.tool_parser is not None:
            content, calls = self.tool_parser.feed(content)
            if finishing:
                c, more = self.tool_parser.finish()
                content, calls = content + c, _merge_tool_deltas(calls + more)
        self.reasoning_parts.append(reasoning)
        self.content_parts.append(content)
        logprobs = self.token_text.chat_logprobs(delta) if self.token_text is not None else []
        self.logprobs.extend(logprobs)
        if finishing:
            called = self.tool_parser is not None and self.tool_parser.has_tool_calls
            self.finish_reason = "tool_calls" if called else delta.finish_reason
        return reasoning, content, calls, logprobs

    def opening(self) -> ChatChunkChoice:
        return ChatChunkChoice(index=self.index, delta=DeltaMessage(role="assistant", content=""))

    def chunks(self, delta: StreamDelta) -> list[ChatChunkChoice]:
        """The stream chunk(s) of one delta: its text, calls and logprobs, then the finish reason."""
        reasoning, content, calls, logprobs = self.feed(delta)
        out = []
        if reasoning or content or calls or logprobs:
            message = DeltaMessage(reasoning_content=reasoning or None, content=content or None,
                                   tool_calls=[DeltaToolCall.model_validate(c.to_openai()) for c in calls] or None)
            out.append(ChatChunkChoice(index=self.index, delta=message,
                                       logprobs=ChoiceLogprobs(content=logprobs) if logprobs else None))
        if self.finish_reason is not None:
            out.append(ChatChunkChoice(index=self.index, delta=DeltaMessage(), finish_reason=self.finish_reason))
        return out

    def choice(self) -> ChatChoice:
        """The complete choice (non-streaming)."""
        content, calls = "".join(self.content_parts), []
        if self.tools:
            content, calls = parse_tool_calls(content)
        message = ChatResponseMessage(
            content=content if content or not calls else None,
            reasoning_content="".join(self.reasoning_parts) if self.reasoning.has_reasoning else None,
            tool_calls=[ResponseToolCall.model_validate(c.to_openai()) for c in calls] or None)
        logprobs = ChoiceLogprobs(content=self.logprobs) if self.token_text is not None else None
        return ChatChoice(index=self.index, message=message, logprobs=logprobs,
                          finish_reason="tool_calls" if calls else self.finish_reason)


class TextChoiceState:
    """One legacy completion as it is generated: text (after the echoed prompt) and parallel-list logprobs."""

    def __init__(self, index: int, echo: str, token_text: TokenText | None) -> None:
        self.index, self.echo, self.token_text = index, echo, token_text
        self.parts: list[str] = [echo]
        self.offset = len(echo)
        self.logprobs = CompletionLogprobs() if token_text is not None else None
        self.num_tokens = 0
        self.finish_reason: str | None = None

    def feed(self, delta: StreamDelta) -> CompletionLogprobs | None:
        """Take one delta; returns its logprobs (with the sampled token among the top ones, as vLLM does)."""
        self.num_tokens += len(delta.token_ids)
        self.parts.append(delta.text)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if self.token_text is None or self.logprobs is None:
            return None
        piece = CompletionLogprobs()
        for j, (token_id, logprob) in enumerate(zip(delta.token_ids, delta.logprobs)):
            text = self.token_text(token_id)[0]
            tops = {text: logprob}
            if j < len(delta.top_logprobs):
                tops.update({self.token_text(t)[0]: lp for t, lp in delta.top_logprobs[j].items()})
            piece.tokens.append(text)
            piece.token_logprobs.append(logprob)
            piece.top_logprobs.append(tops)
            piece.text_offset.append(self.offset)
            self.offset += len(text)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(self.logprobs, name).extend(getattr(piece, name))
        return piece

    def opening(self) -> CompletionChoice | None:
        return CompletionChoice(index=self.index, text=self.echo) if self.echo else None

    def chunks(self, delta: StreamDelta) -> list[CompletionChoice]:
        logprobs = self.feed(delta)
        if not delta.text and logprobs is None and self.finish_reason is None:
            return []
        return [CompletionChoice(index=self.index, text=delta.text, logprobs=logprobs,
                                 finish_reason=self.finish_reason)]

    def choice(self) -> CompletionChoice:
        return CompletionChoice(index=self.index, text="".join(self.parts), logprobs=self.logprobs,
                                finish_reason=self.finish_reason)
