"""`r1forge sample MODEL --rejection -o data/rs.jsonl`: N samples per prompt; keep the correct ones as SFT data.

    r1forge sample runs/grpo-tiny --rejection --num-samples 8 --problems 500 -o data/rs.jsonl
    r1forge sft configs/sft_tiny.yaml --data.files data/rs.jsonl --model.init_from runs/grpo-tiny

Prompts are built-in train-split problems (`--problems`, `--min-steps` ...) or `--prompts FILE.jsonl` of
{"question", "answer"}. With `--rejection` the output holds only correct, well-formed, finished samples
(`r1forge.rl.rejection`); without it, every sample, each annotated with `correct`, `formatted`, `finish_reason`
and `kept`. Statistics (pass@1, pass@N, kept/total) are printed and written to OUTPUT.stats.json.
Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint or run directory (its newest checkpoint), with tokenizer.json")
    p.add_argument("-o", "--output", required=True, help="JSONL file to write (chat records {\"messages\": [...]})")
    p.add_argument("--rejection", action="store_true", help="keep only correct samples (rejection sampling)")
    p.add_argument("-n", "--num-samples", type=int, default=8, help="samples per prompt (N)")
    p.add_argument("--prompts", help="JSONL of {\"question\", \"answer\"} (default: built-in problems)")
    p.add_argument("--problems", type=int, default=200, help="built-in problems to sample on")
    p.add_argument("--split", choices=("train", "test"), default="train", help="built-in problems' split")
    p.add_argument("--min-steps", type=int, default=1, help="built-in problems: fewest solution steps")
    p.add_argument("--max-steps", type=int, default=3, help="built-in problems: most solution steps")
    p.add_argument("--max-operand", type=int, default=99, help="built-in problems: largest operand")
    p.add_argument("--kinds", default="word,expression,equation", help="built-in problem kinds, comma-separated")
    p.add_argument("--template", choices=("chat", "r1-zero"), default="chat", help="prompt template")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=256, help="longest completion in tokens")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the built-in problems and of the sampling (prompt i uses seed + i)")
    p.add_argument("--allow-unformatted", action="store_true",
                   help="with --rejection: keep correct samples even without the <think>/<answer> format")
    p.add_argument("--keep-duplicates", action="store_true", help="keep verbatim repeats within a prompt")
    p.add_argument("--max-per-prompt", type=int, default=None, help="keep at most this many samples per prompt")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def examples_from_args(args: argparse.Namespace) -> list[dict]:
    """The prompts: a JSONL file, or built-in problems of the chosen split and difficulty (the same problem
    source the run configs' `data:` sections describe; errors name its keys)."""
    from r1forge.rl.examples import problem_examples, read_examples
    from r1forge.train.config import ProblemSource

    if args.prompts:
        return read_examples(args.prompts)
    if args.problems <= 0:
        raise ValueError(f"--problems must be positive, got {args.problems}")
    source = ProblemSource(min_steps=args.min_steps, max_steps=args.max_steps, max_operand=args.max_operand,
                           kinds=[k.strip() for k in args.kinds.split(",") if k.strip()])
    source.validate(prefix="")  # errors name the field: --max-steps is max_steps
    return problem_examples(args.problems, args.seed, args.split, source)


def run(args: argparse.Namespace) -> int:
    from r1forge.commands.errors import run_with_errors

    def main() -> int:
        import json
        import sys

        from r1forge.rl.rejection import sample_to_file
        from r1forge.train.prologue import resolve_device

        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        if args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        count, summary, stats = sample_to_file(
            args.model, args.output, examples_from_args(args), args.num_samples, rejection=args.rejection,
            device=resolve_device(args.device, "--device"), template=args.template, temperature=args.temperature,
            top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed, require_format=not args.allow_unformatted,
            dedupe=not args.keep_duplicates, max_per_prompt=args.max_per_prompt)
        print(f"{stats['model']}: {summary.summary()}")
        print(f"wrote {count} records to {args.output}" + (" (correct samples only)" if args.rejection else ""))
        if args.rejection and count == 0:
            print("warning: no sample passed; raise --num-samples or --temperature, or check the prompts' answers",
                  file=sys.stderr)
        print(json.dumps(stats))
        return 0

    return run_with_errors(main)
