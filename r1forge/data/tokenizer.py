"""Byte-level BPE tokenizer: training, loading (ours or a DeepSeek checkpoint's), chat templates, streaming decode.

One class, `Tokenizer`, is what the rest of r1forge sees: it wraps a `tokenizers.Tokenizer` and the
`tokenizer_config.json` beside it. The files it writes load unchanged in `transformers.AutoTokenizer`, and a
DeepSeek checkpoint's files load here: the same ids, the same chat renders.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

from r1forge.data.chat_template import (
    BOS, DEFAULT_CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, TEXT_CONTROL_TOKENS, render_chat,
)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.50 saves the template here; it wins over the config's


def _iter_training_texts(files: list[str] | None, texts: Iterable[str] | None) -> Iterator[str]:
    from r1forge.data.jsonl import iter_jsonl

    yield from texts or ()
    for file in files or ():
        if str(file).endswith(".jsonl"):
            for _, record in iter_jsonl(file):
                if isinstance(record.get("text"), str):
                    yield record["text"]
                for message in record.get("messages") or ():
                    if isinstance(message, dict) and isinstance(message.get("content"), str):
                        yield message["content"]
        else:
            with open(file, encoding="utf-8") as f:
                yield from f


def train_tokenizer(files: list[str] | None, out_dir: str | os.PathLike, vocab_size: int = 4096,
                    texts: Iterable[str] | None = None, min_frequency: int = 2, model_max_length: int = 4096,
                    split_digits: bool = True) -> Path:
    """Train a byte-level BPE with DeepSeek's control tokens and save it in Hugging Face's layout.

    Args:
        files: text files (every line is training text) or JSONL files (`text` fields and message contents).
        out_dir: where tokenizer.json and tokenizer_config.json are written.
        vocab_size: total vocabulary, control tokens included (a small corpus may yield fewer).
        texts: more training text, e.g. `make_pretrain_corpus(...)`.
        min_frequency: a merge must be seen this often.
        model_max_length: recorded in the config for transformers.
        split_digits: every digit its own token, so numbers are spelled digit by digit (arithmetic a small
            model can learn; DeepSeek-V3 splits into groups of up to three).
    Returns:
        out_dir as a Path.
    """
    if files is None and texts is None:
        raise ValueError("train_tokenizer needs files or texts")
    controls = [*SPECIAL_TOKENS, *TEXT_CONTROL_TOKENS]
    if vocab_size < 256 + len(controls) + 1:
        raise ValueError(f"vocab_size must be > 256 bytes + {len(controls)} control tokens, got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # Control tokens take ids 0.. in this order (bos 0, eos 1, pad 2, as in DeepSeek's vocabulary).
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in controls],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_iter_training_texts(files, texts), trainer)
    # The trainer registers every control token as special; the think, answer and tool tokens must decode into
    # text even with skip_special_tokens, so they become plain added tokens (still one token each).
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        added["special"] = added["content"] in SPECIAL_TOKENS
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    }
    out = Tokenizer(tok, config)
    out.save_pretrained(out_dir)
    return Path(out_dir)


def _token_content(value: Any) -> str | None:
    """A config's token entry is a string or, in DeepSeek's files, {"__type": "AddedToken", "content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE spells its tokens in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


# GPT-2's printable stand-ins for bytes, inverted: a byte-level token's spelling -> its raw bytes
UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its config: the one tokenizer interface of r1forge.

    Args:
        tokenizer: the fast tokenizer (vocabulary, merges, added tokens).
        config: the `tokenizer_config.json` contents (special tokens, add_bos_token, chat_template, ...).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict[str, Any] | None = None) -> None:
        self._tok = tokenizer
        self.config = dict(config or {})
        template = self.config.get("chat_template")
        if isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template: str | None = template
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.pad_token = _token_content(self.config.get("pad_token"))
        self.bos_token_id = self._id_of(self.bos_token, "bos_token")
        self.eos_token_id = self._id_of(self.eos_token, "eos_token")
        pad_id = self._id_of(self.pad_token, "pad_token")
        self.pad_token_id = pad_id if pad_id is not None else self.eos_token_id  # DeepSeek pads with eos
        self.model_max_length: int | None = self.config.get("model_max_length")
        added = tokenizer.get_added_tokens_decoder()
        self.added_tokens: dict[str, int] = {t.content: i for i, t in added.items()}
        # Exactly the ids that decode(skip_special_tokens=True) drops: added tokens flagged special.
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self.byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)

    def _id_of(self, token: str | None, key: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer_config.json: {key} {token!r} is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's vocab_size must be at least this)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def vocabulary(self) -> dict[str, int]:
        """Token -> id, added tokens included: two tokenizers with equal vocabularies give the same ids."""
        return self._tok.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def _with_specials(self, ids: list[int]) -> list[int]:
        if self.config.get("add_bos_token") and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        if self.config.get("add_eos_token") and self.eos_token_id is not None:
            ids = [*ids, self.eos_token_id]
        return ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; control tokens written in the text become their single ids.

        add_special_tokens adds bos (and eos) as the config's add_bos_token / add_eos_token say; without those
        keys, the tokenizer.json post-processor decides (as transformers does).
        """
        if add_special_tokens and ("add_bos_token" in self.config or "add_eos_token" in self.config):
            return self._with_specials(self._tok.encode(text, add_special_tokens=False).ids)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` over many texts, in parallel threads (tokenizers' Rust batch path)."""
        if add_special_tokens and ("add_bos_token" in self.config or "add_eos_token" in self.config):
            return [self._with_specials(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character span in `text` (for masks over rendered chats)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; skip_special_tokens drops bos/eos/pad/turn markers but keeps think, answer, tool tags."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                    tools: list[dict[str, Any]] | None = None, **template_kwargs: Any) -> str:
        """The chat template's text for `messages` (see `apply_chat_template`)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        special.update({k: _token_content(self.config[k]) for k in ("unk_token",) if self.config.get(k)})
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           special_tokens={k: v for k, v in special.items() if v is not None}, **template_kwargs)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tools: list[dict[str, Any]] | None = None, thinking: bool = True,
                            keep_reasoning: bool = False, tokenize: bool = True,
                            **template_kwargs: Any) -> list[int] | str:
        """Render a conversation with the chat template, like transformers' method of the same name.

        Args:
            messages: OpenAI-style messages.
            add_generation_prompt: end with `<｜Assistant｜>` (and `<think>\\n` when thinking).
            tools: function schemas, described in the system part.
            thinking: open the generated turn with `<think>\\n` (R1's default).
            keep_reasoning: keep assistant reasoning (SFT renders); false strips it from history, like R1.
            tokenize: return ids (no bos added beyond the template's own) instead of text.
            template_kwargs: more template variables.
        """
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                thinking=thinking, keep_reasoning=keep_reasoning, **template_kwargs)
        return self.encode(text) if tokenize else text

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (loadable by `load_tokenizer` and transformers)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / TOKENIZER_FILE))
        config = dict(self.config)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class IncrementalDecoder:
    """Streaming detokenisation: feed ids one at a time, get exactly the text a full `decode` would have.

    Byte-level BPE splits characters across tokens (an emoji is often two or three tokens), so each token is
    turned into its bytes and the bytes go through an incremental UTF-8 decoder that holds an incomplete
    character back until its last byte arrives. Invalid bytes become U+FFFD as in a full decode. Tokenizers
    whose decoder is not byte-level fall back to decoding the whole stream each step and emitting the new
    suffix once it no longer ends in U+FFFD.

    Usage: `text = "".join(dec.add(i) for i in ids) + dec.finish()` equals `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._bytes: dict[int, bytes] = {}
        self._ids: list[int] = []  # fallback path only
        self._emitted = 0  # fallback path only

    def _token_bytes(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            token = self.tokenizer.id_to_token(token_id)
            if token is None:
                raise ValueError(f"token id {token_id} is not in the vocabulary (size {self.tokenizer.vocab_size})")
            # tokenizers' ByteLevel decoder: every character mapped back to its byte, or, when some character
            # is not a byte stand-in (e.g. the fullwidth bars of DeepSeek's control tokens), the raw UTF-8.
            if all(c in UNICODE_TO_BYTE for c in token):
                cached = bytes(UNICODE_TO_BYTE[c] for c in token)
            else:
                cached = token.encode("utf-8")
            self._bytes[token_id] = cached
        return cached

    def add(self, token_id: int) -> str:
        """Feed one token id; return the text it completes (possibly empty)."""
        if not self.tokenizer.byte_level:
            self._ids.append(token_id)
            text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
            if text.endswith("\ufffd") or len(text) < self._emitted:
                return ""
            new, self._emitted = text[self._emitted:], len(text)
            return new
        if self.skip_special_tokens and token_id in self.tokenizer.special_token_ids:
            return ""
        return self._utf8.decode(self._token_bytes(token_id))

    def finish(self) -> str:
        """End of stream: whatever is still held back (an incomplete character becomes U+FFFD)."""
        if not self.tokenizer.byte_level:
            text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
            new, self._emitted = text[self._emitted:], len(text)
            return new
        return self._utf8.decode(b"", final=True)


def load_tokenizer(path_or_dir: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer directory (tokenizer.json, tokenizer_config.json, optional chat_template.jinja) or a
    tokenizer.json path, ours or a DeepSeek checkpoint's."""
    path = Path(path_or_dir)
    directory = path if path.is_dir() else path.parent
    tokenizer_file = directory / TOKENIZER_FILE if path.is_dir() else path
    if not tokenizer_file.is_file():
        raise ValueError(f"no tokenizer file at {tokenizer_file}")
    try:
        tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{tokenizer_file}: cannot load tokenizer ({e})") from e
    config: dict[str, Any] = {}
    config_file = directory / CONFIG_FILE
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: invalid JSON ({e})") from e
    if (directory / TEMPLATE_FILE).is_file():
        config["chat_template"] = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    return Tokenizer(tok, config)
