"""`r1forge tokenizer train --files A.txt B.jsonl --vocab-size 4096 --out DIR` (or `--synthetic N`).

Trains a byte-level BPE with DeepSeek's control tokens (`r1forge.data.train_tokenizer`) and saves it in the
Hugging Face layout (tokenizer.json + tokenizer_config.json with the chat template), loadable by
`r1forge.data.load_tokenizer` and `transformers.AutoTokenizer`. `--synthetic N` trains on N documents of the
built-in arithmetic corpus (also combinable with --files).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--files", nargs="+", default=[], help="text files (every line is text) or JSONL files "
                   "(`text` fields and chat message contents)")
    t.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="also train on N documents of the built-in arithmetic corpus")
    t.add_argument("--seed", type=int, default=0, help="seed of the built-in corpus")
    t.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size, control tokens included")
    t.add_argument("--min-frequency", type=int, default=2, help="a merge must occur at least this often")
    t.add_argument("--no-split-digits", action="store_true", help="let BPE merge digits (default: one per digit)")
    t.add_argument("--out", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    from r1forge.commands.errors import run_with_errors

    def main() -> int:
        from r1forge.data import load_tokenizer, make_pretrain_corpus, train_tokenizer

        if args.synthetic < 0:
            raise ValueError(f"--synthetic must be >= 0, got {args.synthetic}")
        if not args.files and not args.synthetic:
            raise ValueError("nothing to train on: give --files and/or --synthetic N")
        for file in args.files:
            if not Path(file).is_file():
                raise ValueError(f"--files: {file} is not a file")
        texts = make_pretrain_corpus(args.synthetic, args.seed) if args.synthetic else None
        out = train_tokenizer(args.files or None, args.out, vocab_size=args.vocab_size, texts=texts,
                              min_frequency=args.min_frequency, split_digits=not args.no_split_digits)
        tok = load_tokenizer(out)
        print(f"tokenizer with {tok.vocab_size} tokens written to {out}")
        return 0

    return run_with_errors(main)
