"""Speculative decoding with the MTP module: acceptance per draft position and tokens/s with and without it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/speculative.py                  # demo model if trained, else trains one
    OMP_NUM_THREADS=1 .venv/bin/python bench/speculative.py --k 1 2 3 --batch-sizes 1 8 32 --max-tokens 64

The model is the demo's pretrained one (runs/demo/pretrain, written by `r1forge demo`) when it exists; otherwise
the bench pretrains the demo's model on the built-in arithmetic corpus with the demo's recipe for
`--pretrain-steps` steps (cached under --work-dir), then SFTs it briefly with the MTP loss on, as `r1forge sft`
now does. Prompts are held-out problems (the test split, never trained on) in the R1-Zero template for the
pretrained model and the chat template for the SFT'd one. For each model, batch size and temperature (greedy
and T = 1) it prints plain-decode tokens/s, then for each k the speculative tokens/s, the ratio, per-position
acceptance and the mean tokens a verifying step emits, all in one run on the same weights and prompts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from r1forge import LLM, SamplingParams


def _train(work: Path, pretrain_steps: int, sft_steps: int) -> dict[str, Path]:
    """The demo's pretrain stage (shortened) and a short SFT with MTP kept trained; cached in `work`."""
    from r1forge.demo import stage_configs
    from r1forge.train import run_pretrain, run_sft
    from r1forge.train.checkpointing import resolve_model_dir

    configs = stage_configs(work, {
        "pretrain": ["--train.steps", str(pretrain_steps), "--train.warmup_steps", str(min(30, pretrain_steps // 10)),
                     "--log.eval_every", "0", "--log.save_every", "50", "--log.progress", "false"],
        "sft": ["--train.steps", str(sft_steps), "--model.mtp", "true", "--train.mtp_lambda", "0.1"]})
    pre_dir, sft_dir = work / "pretrain", work / "sft"
    if not (pre_dir / "DONE").exists():
        run_pretrain(configs["pretrain"])
        (pre_dir / "DONE").touch()
    if not (sft_dir / "DONE").exists():
        run_sft(configs["sft"])
        (sft_dir / "DONE").touch()
    return {"pretrained": resolve_model_dir(pre_dir), "sft (MTP trained)": resolve_model_dir(sft_dir)}


def _prompts(llm: LLM, count: int, template: str) -> list[list[int]]:
    from r1forge.demo import stage_configs
    from r1forge.rl.examples import train_and_held_out
    from r1forge.rl.templates import render_prompt

    grpo = stage_configs("runs/unused")["grpo"]
    _, held_out = train_and_held_out(grpo.data, grpo.seed)
    return [render_prompt(llm.tokenizer, ex["question"], template)[1] for ex in held_out[:count]]


def _run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, dict[str, float]]:
    """Tokens/s of one generate call over `prompts` (after a warm-up on the first prompt), and the spec stats."""
    llm.generate(prompts[:1], params)
    before = llm.stats()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    after = llm.stats()
    delta = {k: after[k] - before.get(k, 0) for k in after if k.startswith("spec_") and "rate" not in k
             and "mean" not in k}
    return tokens / elapsed, delta | {"outputs": [c.token_ids for o in outs for c in o.outputs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None, help="model directory (repeatable; default: see above)")
    ap.add_argument("--work-dir", default="runs/bench_speculative")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--template", choices=["auto", "chat", "r1-zero"], default="auto",
                    help="prompt template; auto: chat for a model whose name says sft, else r1-zero")
    ap.add_argument("--disable-by-batch-size", type=int, default=None,
                    help="speculative_config.disable_by_batch_size: plain decode in steps with more running sequences")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.model:
        models = {Path(m).name: Path(m) for m in args.model}
    elif (Path("runs/demo/pretrain") / "DONE.json").exists():
        from r1forge.train.checkpointing import resolve_model_dir

        models = {"demo pretrained": resolve_model_dir("runs/demo/pretrain")}
    else:
        models = _train(Path(args.work_dir), args.pretrain_steps, args.sft_steps)
    print(f"torch threads {torch.get_num_threads()}; max_tokens {args.max_tokens}; held-out prompts; "
          f"disable_by_batch_size {args.disable_by_batch_size}")
    for name, directory in models.items():
        plain = LLM(directory, device="cpu", block_size=16)
        specs = {k: LLM(directory, device="cpu", block_size=16,
                        speculative_config={"method": "mtp", "num_speculative_tokens": k,
                                            "disable_by_batch_size": args.disable_by_batch_size}) for k in args.k}
        template = args.template if args.template != "auto" else "chat" if "sft" in name else "r1-zero"
        prompts = _prompts(plain, max(args.batch_sizes), template)
        print(f"\n== {name}: {directory} ({template} prompts)")
        print(f"{'batch':>5} {'T':>4} {'plain tok/s':>11} | " + " | ".join(
            f"k={k}: {'tok/s':>7} {'x':>5} {'accept/pos':>16} {'len':>4}" for k in args.k))
        for temp in args.temperatures:
            for bs in args.batch_sizes:
                params = SamplingParams(temperature=temp, max_tokens=args.max_tokens, seed=0 if temp else None)
                base, base_stats = _run(plain, prompts[:bs], params)
                cells = []
                for k, llm in specs.items():
                    rate, st = _run(llm, prompts[:bs], params)
                    if temp == 0:
                        assert st["outputs"] == base_stats["outputs"], "speculative greedy output differs from plain"
                    per_pos = "/".join(f"{_rate(st, j):.2f}" for j in range(1, k + 1))
                    mean_len = (st["spec_accepted_tokens"] + st["spec_verify_steps"]) / max(st["spec_verify_steps"], 1)
                    cells.append(f"     {rate:7.1f} {rate / base:5.2f} {per_pos:>16} {mean_len:4.2f}")
                print(f"{bs:>5} {temp:>4.1f} {base:>11.1f} | " + " | ".join(cells))


def _rate(stats: dict, j: int) -> float:
    drafted = stats.get(f"spec_draft_tokens_pos{j}", 0)
    return stats.get(f"spec_accepted_tokens_pos{j}", 0) / drafted if drafted else 0.0


if __name__ == "__main__":
    main()
