"""`r1forge generate MODEL_DIR --prompt ... [--prompts-file F]`: batched generation from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

from r1forge.commands.engine_args import add_engine_arguments, engine_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a file with one prompt per line (or JSONL with a 'prompt' field)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn with the chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--json", action="store_true", help="print one JSON object per completion")
    add_engine_arguments(p)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    try:
                        prompts.append(json.loads(line)["prompt"])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise SystemExit(f"{args.prompts_file}:{lineno}: expected a JSON object with 'prompt' ({e})")
                else:
                    prompts.append(line)
    if not prompts:
        raise SystemExit("no prompts: give --prompt or --prompts-file")
    return prompts


def run(args: argparse.Namespace) -> int:
    from r1forge.commands.errors import run_with_errors

    return run_with_errors(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from r1forge import LLM, SamplingParams

    prompts = read_prompts(args)
    llm = LLM(args.model, **engine_kwargs(args))
    if llm.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer.json: text prompts need a tokenizer")
    inputs: list = prompts
    if args.chat:
        inputs = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                  for p in prompts]
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop)
    t = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=len(prompts) > 1)
    elapsed = time.perf_counter() - t
    n_tokens = 0
    for prompt, out in zip(prompts, outs):
        for c in out.outputs:
            n_tokens += len(c.token_ids)
            if args.json:
                print(json.dumps({"prompt": prompt, "index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                                  "num_tokens": len(c.token_ids)}, ensure_ascii=False))
            else:
                print(f"### {prompt!r} [{c.index}] ({c.finish_reason}, {len(c.token_ids)} tokens)\n{c.text}\n")
    print(f"{len(prompts)} prompts, {n_tokens} tokens in {elapsed:.2f}s ({n_tokens / elapsed:.1f} tok/s)",
          file=sys.stderr)
    return 0
