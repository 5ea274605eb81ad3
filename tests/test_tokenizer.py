"""Tokenizer: training, round trips, transformers parity (ids and chat renders), streaming decode, DeepSeek configs."""

from __future__ import annotations

import json
import random

import pytest

from r1forge.data import IncrementalDecoder, load_tokenizer, make_pretrain_corpus, train_tokenizer
from r1forge.data.chat_template import (
    ANSWER_END, ANSWER_START, ASSISTANT, BOS, EOS, PAD, SPECIAL_TOKENS, TEXT_CONTROL_TOKENS, THINK_END, THINK_START,
    TOOL_TOKENS, USER,
)

UNICODE_TEXTS = [
    "Hello, world! 123 + 456 = 579.",
    "naïve café, Ελληνικά, русский, עברית, العربية",
    "日本語のテキストと中文字符。한국어도.",
    "emoji 😀🎉👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and skin 👍🏽",
    "tabs\tand\nnewlines\r\n  double  spaces   ",
    "combining e\u0301 and zero\u200bwidth, math ∑∫√∞ ≤ ≥",
    "",
    " leading space",
    "<think>\nreasoning\n</think>\n<answer>42</answer>",
]

# DeepSeek-R1's chat template as shipped in its tokenizer_config.json (January 2025).
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜>"
    "<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + "
    "'\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}"
    "{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}{{'<｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    "{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "<think>\n2 + 2 = 4.\n</think>\n<answer>4</answer>"},
     {"role": "user", "content": "And 3 + 3? 😀"}],
    [{"role": "system", "content": "One."}, {"role": "user", "content": "hi"}, {"role": "system", "content": "Two."},
     {"role": "assistant", "content": "hello", "reasoning_content": "greet back"}],
    [{"role": "user", "content": "Weather in Paris and Rome?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
     {"role": "tool", "content": "18C, sunny"}, {"role": "tool", "content": "25C, clear"},
     {"role": "assistant", "content": "Paris 18C, Rome 25C."},
     {"role": "user", "content": "Thanks"}],
    [{"role": "user", "content": "Weather?"},
     {"role": "assistant", "content": "Let me check.", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
     {"role": "tool", "content": "-3C"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    corpus_file = out.parent / "corpus.txt"
    corpus_file.write_text("\n".join(UNICODE_TEXTS) + "\n", encoding="utf-8")
    train_tokenizer([str(corpus_file)], out, vocab_size=1024, texts=make_pretrain_corpus(1500, seed=0))
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_control_tokens_are_single_ids_and_skipping_keeps_text_tags(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert 300 < tok.vocab_size <= 1024
    for token in (*SPECIAL_TOKENS, *TEXT_CONTROL_TOKENS):
        assert len(tok.encode(token)) == 1, token
    assert tok.special_token_ids == {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    text = f"{BOS}{USER}hi{ASSISTANT}{THINK_START}\nx\n{THINK_END}{ANSWER_START}4{ANSWER_END}{TOOL_TOKENS[0]}{EOS}{PAD}"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == f"hi{THINK_START}\nx\n{THINK_END}{ANSWER_START}4{ANSWER_END}" \
                                                        f"{TOOL_TOKENS[0]}"
    assert tok.encode("3 + 4", add_special_tokens=True) == [tok.bos_token_id, *tok.encode("3 + 4")]


def test_digits_are_single_tokens(tok):
    ids = tok.encode("1234567890")
    assert len(ids) == 10 and tok.decode(ids[3:5]) == "45"


def test_round_trip_arbitrary_text(tok):
    rng = random.Random(0)
    texts = list(UNICODE_TEXTS)
    for _ in range(200):  # random code points from all planes, surrogates excluded
        texts.append("".join(chr(rng.choice([rng.randrange(32, 0x7F), rng.randrange(0xA0, 0xD7FF),
                                             rng.randrange(0xE000, 0x10FFFF)])) for _ in range(rng.randint(1, 30))))
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


def test_transformers_loads_with_identical_ids(tok, hf_tok):
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    for text in [*UNICODE_TEXTS, f"{USER}q{ASSISTANT}{THINK_START}a{THINK_END}{EOS}"]:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)
        ids = tok.encode(f"{BOS}{text}{EOS}")
        for skip in (False, True):
            assert hf_tok.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_matches_transformers(tok, hf_tok, conversation):
    for prompt in (False, True):
        for thinking in (True, False):
            for keep in (False, True):
                for tools in (None, [WEATHER_TOOL]):
                    kwargs = dict(add_generation_prompt=prompt, tools=tools, thinking=thinking, keep_reasoning=keep)
                    ours = tok.apply_chat_template(conversation, tokenize=False, **kwargs)
                    assert hf_tok.apply_chat_template(conversation, tokenize=False, **kwargs) == ours
                    hf_ids = hf_tok.apply_chat_template(conversation, tokenize=True, **kwargs)
                    hf_ids = hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids
                    assert hf_ids == tok.apply_chat_template(conversation, **kwargs)


def test_chat_template_layout(tok):
    conv = CONVERSATIONS[1]
    text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert text == (f"{BOS}Be brief.{USER}2 + 2?{ASSISTANT}\n<answer>4</answer>{EOS}{USER}And 3 + 3? 😀"
                    f"{ASSISTANT}<think>\n")
    assert tok.apply_chat_template(conv, add_generation_prompt=True, thinking=False, tokenize=False).endswith(
        f"3 + 3? 😀{ASSISTANT}")
    kept = tok.apply_chat_template(conv, keep_reasoning=True, tokenize=False)
    assert f"{ASSISTANT}<think>\n2 + 2 = 4.\n</think>\n<answer>4</answer>{EOS}" in kept
    reasoned = tok.apply_chat_template(CONVERSATIONS[2], keep_reasoning=True, tokenize=False)
    assert reasoned == f"{BOS}One.\n\nTwo.{USER}hi{ASSISTANT}<think>\ngreet back\n</think>\nhello{EOS}"
    tools = tok.apply_chat_template(CONVERSATIONS[3], tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=False)
    assert "### get_weather\nDescription: Current weather in a city.\nParameters: {\"type\": \"object\"" in tools
    assert (f"{USER}Weather in Paris and Rome?{ASSISTANT}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
            "<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n"
            "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Rome\"}\n```"
            f"<｜tool▁call▁end｜><｜tool▁calls▁end｜>{EOS}<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18C, sunny"
            "<｜tool▁output▁end｜><｜tool▁output▁begin｜>25C, clear<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
            f"Paris 18C, Rome 25C.{EOS}{USER}Thanks{ASSISTANT}<think>\n") in tools
    # A conversation ending in tool outputs closes them and is continued without a new assistant header.
    assert tok.apply_chat_template(CONVERSATIONS[4], add_generation_prompt=True, tokenize=False).endswith(
        "<｜tool▁output▁begin｜>-3C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")


def test_chat_template_errors_are_value_errors(tok):
    with pytest.raises(ValueError, match="unknown message role robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        tok.apply_chat_template(["not a dict"])


def test_incremental_decoder_equals_full_decode(tok):
    rng = random.Random(1)
    control_ids = [tok.token_to_id(t) for t in (*SPECIAL_TOKENS, *TEXT_CONTROL_TOKENS)]
    emoji_ids = tok.encode("😀🎉👩‍👧 日本語 Ελληνικά")
    for _ in range(600):
        pool = rng.choice([emoji_ids, control_ids + emoji_ids, list(range(tok.vocab_size))])
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 40))]
        for skip in (False, True):
            dec = IncrementalDecoder(tok, skip_special_tokens=skip)
            assert "".join(dec.add(i) for i in ids) + dec.finish() == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_decoder_never_emits_half_characters(tok):
    text = "emoji 😀🎉👩‍👩‍👧‍👦 日本語 " * 3
    ids = tok.encode(text)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # the test has teeth: some tokens split characters
    dec = tok.incremental_decoder()
    pieces = [dec.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.finish() == text


def test_save_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path / "tokenizer.json")
    conv = CONVERSATIONS[3]
    assert again.apply_chat_template(conv, tools=[WEATHER_TOOL]) == tok.apply_chat_template(conv, tools=[WEATHER_TOOL])
    assert again.encode(UNICODE_TEXTS[3]) == tok.encode(UNICODE_TEXTS[3])


def _added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


@pytest.fixture()
def deepseek_dir(tok_dir, tmp_path):
    """A checkpoint directory shaped like DeepSeek-R1's: LlamaTokenizerFast config, AddedToken dicts, pad = eos."""
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": _added(BOS), "eos_token": _added(EOS),
              "pad_token": _added(EOS), "clean_up_tokenization_spaces": False, "legacy": True,
              "model_max_length": 16384, "sp_model_kwargs": {}, "unk_token": None,
              "tokenizer_class": "LlamaTokenizerFast", "chat_template": R1_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return tmp_path


def test_loads_deepseek_style_checkpoint(deepseek_dir):
    tok = load_tokenizer(deepseek_dir)
    assert tok.bos_token == BOS and tok.pad_token_id == tok.eos_token_id == tok.token_to_id(EOS)
    assert tok.model_max_length == 16384
    assert tok.encode("hi", add_special_tokens=True)[0] == tok.bos_token_id
    conv = CONVERSATIONS[1]
    # R1's own template: always opens <think>, always strips history reasoning, ignores our extra variables.
    assert tok.apply_chat_template(conv, add_generation_prompt=True, thinking=False, tokenize=False) == (
        f"{BOS}Be brief.{USER}2 + 2?{ASSISTANT}\n<answer>4</answer>{EOS}{USER}And 3 + 3? 😀{ASSISTANT}<think>\n")
    calls = tok.apply_chat_template(CONVERSATIONS[4], tokenize=False)
    assert ("Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
            in calls)


def test_r1_template_renders_as_transformers_renders_it(deepseek_dir):
    from transformers.utils import chat_template_utils as utils
    tok = load_tokenizer(deepseek_dir)
    for conv in (CONVERSATIONS[0], CONVERSATIONS[1], CONVERSATIONS[4]):
        for prompt in (False, True):
            rendered, _ = utils.render_jinja_template(conversations=[conv], chat_template=R1_TEMPLATE,
                                                      add_generation_prompt=prompt, bos_token=BOS, eos_token=EOS)
            assert rendered[0] == tok.apply_chat_template(conv, add_generation_prompt=prompt, tokenize=False)


def test_chat_template_jinja_file_wins(deepseek_dir):
    # transformers' {% generation %} tag (assistant masks) must parse and render its body.
    (deepseek_dir / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}",
        encoding="utf-8")
    tok = load_tokenizer(deepseek_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == f"{BOS}[x]"


def test_load_errors_name_the_file(tmp_path, tok_dir):
    with pytest.raises(ValueError, match="no tokenizer file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json: invalid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}), encoding="utf-8")
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the vocabulary"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="files or texts"):
        train_tokenizer(None, tmp_path / "x")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(None, tmp_path / "x", vocab_size=100, texts=["a"])


def test_incremental_decoder_fallback_for_other_decoders(tok_dir):
    """A tokenizer whose decoder is not byte-level (here Metaspace) streams by re-decoding, still exactly."""
    import tokenizers
    from tokenizers import decoders

    from r1forge.data import Tokenizer

    raw = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    raw.decoder = decoders.Metaspace()
    meta = Tokenizer(raw, {"eos_token": EOS})
    assert not meta.byte_level
    rng = random.Random(2)
    for _ in range(50):
        ids = [rng.randrange(meta.vocab_size) for _ in range(rng.randint(0, 20))]
        dec = meta.incremental_decoder()
        assert "".join(dec.add(i) for i in ids) + dec.finish() == meta.decode(ids)
