"""DeepSeek-R1's control tokens and chat template, and a Jinja renderer that matches transformers exactly.

The template follows DeepSeek-R1's `tokenizer_config.json` (bos, system prompts gathered at the top,
`<｜User｜>` / `<｜Assistant｜>` turns closed by `<｜end▁of▁sentence｜>`, reasoning before `</think>` dropped from
assistant history, a generation prompt that opens `<think>\\n`) and DeepSeek-V3's tool-call layout. Differences
from R1's own template, each a template variable or a fix:

1. `thinking` (default true): false leaves the generation prompt at `<｜Assistant｜>`, so the model decides.
2. `keep_reasoning` (default false): true keeps assistant reasoning, as SFT renders need; a message's
   `reasoning_content` is then written back as `<think>\\n...\\n</think>\\n` before its content.
3. `tools` are described in the system part (R1's template ignores them); several tool-calling assistant
   turns and tool outputs open and close their sections correctly (R1's template loses track after the first).
4. An unknown role is an error (`raise_exception`) instead of being silently dropped.

`render_chat` uses the same sandboxed Jinja environment as `transformers` (trim/lstrip blocks, loop controls,
a `tojson` that does not escape HTML, `raise_exception`, `strftime_now`, the `{% generation %}` tag), so any
checkpoint's template renders here exactly as it does there.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from r1forge.data.tags import ANSWER_END, ANSWER_START, THINK_END, THINK_START

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
TOOL_TOKENS = (
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
)
# Skipped by decode(skip_special_tokens=True): sequence and turn markers, which are never part of an answer.
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT)
# Always decoded into text: the server splits reasoning on the think tags and parses the tool markers.
TEXT_CONTROL_TOKENS = (THINK_START, THINK_END, ANSWER_START, ANSWER_END, *TOOL_TOKENS)

_TOOLS_PREAMBLE = (
    "## Tools\n\nYou can call the following functions. Each is described by its name, what it does and a JSON "
    "schema of its arguments."
)
_TOOLS_FORMAT = (
    "\n\nTo call functions, answer in exactly this format, one <｜tool▁call▁begin｜>...<｜tool▁call▁end｜> "
    "block per call, the arguments a JSON object that follows the function's schema:\n"
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>FUNCTION_NAME\n"
    "```json\n{\"ARGUMENT\": VALUE}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>\n"
    "The results come back between <｜tool▁outputs▁begin｜> and <｜tool▁outputs▁end｜>."
)

DEFAULT_CHAT_TEMPLATE = (
    "{%- if add_generation_prompt is not defined -%}{%- set add_generation_prompt = false -%}{%- endif -%}\n"
    "{%- if thinking is not defined -%}{%- set thinking = true -%}{%- endif -%}\n"
    "{%- if keep_reasoning is not defined -%}{%- set keep_reasoning = false -%}{%- endif -%}\n"
    "{%- set ns = namespace(system_prompt='', is_first_sp=true, is_tool=false) -%}\n"
    "{%- for message in messages -%}\n"
    "  {%- if message['role'] == 'system' -%}\n"
    "    {%- if ns.is_first_sp -%}{%- set ns.system_prompt = message['content'] -%}"
    "{%- set ns.is_first_sp = false -%}\n"
    "    {%- else -%}{%- set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] -%}{%- endif -%}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{{- bos_token -}}{{- ns.system_prompt -}}\n"
    "{%- if tools -%}\n"
    "  {%- if ns.system_prompt -%}{{- '\\n\\n' -}}{%- endif -%}\n"
    "  {{- " + json.dumps(_TOOLS_PREAMBLE, ensure_ascii=False) + " -}}\n"
    "  {%- for tool in tools -%}\n"
    "    {%- set fn = tool['function'] if tool['function'] is defined else tool -%}\n"
    "    {{- '\\n\\n### ' + fn['name'] -}}\n"
    "    {%- if fn['description'] is defined -%}{{- '\\nDescription: ' + fn['description'] -}}{%- endif -%}\n"
    "    {%- if fn['parameters'] is defined -%}{{- '\\nParameters: ' + fn['parameters'] | tojson -}}{%- endif -%}\n"
    "  {%- endfor -%}\n"
    "  {{- " + json.dumps(_TOOLS_FORMAT, ensure_ascii=False) + " -}}\n"
    "{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "  {%- set content = message['content'] if message['content'] is defined and message['content'] is not none"
    " else '' -%}\n"
    "  {%- if content is not string -%}\n"
    "    {%- set content = content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}\n"
    "  {%- endif -%}\n"
    "  {%- if message['role'] == 'user' -%}\n"
    "    {%- set ns.is_tool = false -%}\n"
    "    {{- '<｜User｜>' + content -}}\n"
    "  {%- elif message['role'] == 'assistant' -%}\n"
    "    {%- if keep_reasoning and message['reasoning_content'] is defined -%}\n"
    "      {%- set content = '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n' + content -%}\n"
    "    {%- elif not keep_reasoning and '</think>' in content -%}\n"
    "      {%- set content = content.split('</think>')[-1] -%}\n"
    "    {%- endif -%}\n"
    "    {%- if ns.is_tool -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- else -%}{{- '<｜Assistant｜>' -}}{%- endif -%}\n"
    "    {%- set ns.is_tool = false -%}\n"
    "    {{- content -}}\n"
    "    {%- if message['tool_calls'] is defined and message['tool_calls'] -%}\n"
    "      {{- '<｜tool▁calls▁begin｜>' -}}\n"
    "      {%- for call in message['tool_calls'] -%}\n"
    "        {%- set fn = call['function'] -%}\n"
    "        {%- set args = fn['arguments'] if fn['arguments'] is defined else {} -%}\n"
    "        {%- if args is not string -%}{%- set args = args | tojson -%}{%- endif -%}\n"
    "        {%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}\n"
    "        {{- '<｜tool▁call▁begin｜>' + (call['type'] if call['type'] is defined else 'function') + '<｜tool▁sep｜>'"
    " + fn['name'] + '\\n```json\\n' + args + '\\n```<｜tool▁call▁end｜>' -}}\n"
    "      {%- endfor -%}\n"
    "      {{- '<｜tool▁calls▁end｜>' -}}\n"
    "    {%- endif -%}\n"
    "    {{- '<｜end▁of▁sentence｜>' -}}\n"
    "  {%- elif message['role'] == 'tool' -%}\n"
    "    {%- if not ns.is_tool -%}{{- '<｜tool▁outputs▁begin｜>' -}}{%- endif -%}\n"
    "    {%- set ns.is_tool = true -%}\n"
    "    {{- '<｜tool▁output▁begin｜>' + content + '<｜tool▁output▁end｜>' -}}\n"
    "  {%- elif message['role'] != 'system' -%}\n"
    "    {{- raise_exception('unknown message role ' + message['role'] | string"
    " + ': expected system, user, assistant or tool') -}}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if ns.is_tool -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- endif -%}\n"
    "{%- if add_generation_prompt and not ns.is_tool -%}\n"
    "  {{- '<｜Assistant｜>' -}}{%- if thinking -%}{{- '<think>\\n' -}}{%- endif -%}\n"
    "{%- endif -%}\n"
)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers (and so every chat template) expects plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile once per template string, in transformers' sandboxed environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What transformers does before rendering: drop None values, alias reasoning fields to `reasoning_content`.

    Dropping None matters because OpenAI clients send `content: null` next to `tool_calls`.
    """
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False,
                tools: list[dict[str, Any]] | None = None, special_tokens: dict[str, str | None] | None = None,
                **template_kwargs: Any) -> str:
    """Render a conversation to text, as `transformers`' `apply_chat_template(..., tokenize=False)` would.

    Args:
        template: the Jinja chat template.
        messages: OpenAI-style messages (`role`, `content`, optional `tool_calls`, `reasoning_content`).
        add_generation_prompt: end with the opening of an assistant turn.
        tools: OpenAI-style function schemas, or None.
        special_tokens: `bos_token`, `eos_token`, ... as the template sees them.
        template_kwargs: further template variables (`thinking`, `keep_reasoning`, ...).
    Returns:
        The rendered text.
    """
    compiled = compile_chat_template(template)
    variables = {**(special_tokens or {}), **template_kwargs}
    try:
        return compiled.render(messages=normalize_messages(messages), tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e}") from e
