"""GRPO step time on the CPU: rollout seconds and training seconds per step, the training pass as it was before
issue 17 (micro_batch_size rows at a time, each padded to the batch's longest row, LM head and log_softmax over
every padded position) against the current one (token-budget micro-batches of length-sorted rows, each trimmed to
its own longest row, the head on completion positions only), on the same rollouts, in one run.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/grpo.py             # max completion 32, 64, 256
    OMP_NUM_THREADS=1 .venv/bin/python bench/grpo.py --lengths 64 --modes fixed --repeats 3
    OMP_NUM_THREADS=1 .venv/bin/python bench/grpo.py --profile train --lengths 64   # torch.profiler's top ops
        (also --profile train-old: the padded pass; --profile rollout)

The policy is a randomly initialised `small`-shaped DeepSeek model (MLA + MoE; 8.5M parameters, 5.0M active with
the 4096-token vocabulary), P prompts x G completions per step, prompts the last `--prompt-len` tokens of the
R1-Zero template under a byte tokenizer. Two length regimes:
  natural: the rollout stops on 3 / max_len of the vocabulary, so the random policy's completions end after
           about max_len / 3 tokens (geometric: skewed, as real completion lengths are) or at the limit;
  fixed:   ignore_eos, every completion is max_len tokens (no padding to save; the split is the same).
Training seconds are one pass over the batch: forward, backward, clipping and the AdamW step (loss_type dapo).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any

import torch

from r1forge import ModelConfig, build_model
from r1forge.rl.config import GRPOConfig
from r1forge.rl.grpo_loss import group_advantages, grpo_loss
from r1forge.rl.rollout import RolloutBatch

try:
    from r1forge.rl.rollout import token_budget_micro_batches
except ImportError:  # r1forge before issue 17 on PYTHONPATH: "new" is then that tree's own (padded) pass
    token_budget_micro_batches = None
from r1forge.rl.trainer import GRPOTrainer

QUESTIONS = [{"question": f"Compute {a} + {b}.", "answer": str(a + b)} for a in range(1, 9) for b in range(1, 9)]
ALPHABET = "0123456789 abcdefghijklmnopqrstuvwxyz+-*/=.<>"


class ByteTokenizer:
    """ids 0 pad, 1 bos, 2 eos, 3..258 bytes; every other id decodes to one character of ALPHABET."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [3 + b for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 3) if 3 <= i < 99 else ALPHABET[i % len(ALPHABET)] for i in ids if i > 2)


def digit_share(prompt: str, completion: str, **example: Any) -> tuple[float, dict[str, float]]:
    share = sum(ch.isdigit() for ch in completion) / max(len(completion), 1)
    return share, {"digits": share}


def stop_ids(max_len: int, vocab_size: int) -> list[int]:
    """The natural regime's stop tokens: 3 / max_len of the vocabulary (mean length about max_len / 3)."""
    return list(range(vocab_size - max(1, int(3.0 / max_len * vocab_size)), vocab_size))


def build(max_len: int, fixed: bool, prompts: int = 8, generations: int = 8, micro_batch_size: int = 16,
          preset: str = "small", vocab_size: int = 4096, prompt_len: int = 64, seed: int = 0,
          tokenizer: Any = None) -> GRPOTrainer:
    """A GRPOTrainer over a random `preset` policy whose rollouts end naturally or run to `max_len`."""
    tok = tokenizer or ByteTokenizer(vocab_size)
    torch.manual_seed(seed)
    config = ModelConfig.from_preset(preset, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                     num_nextn_predict_layers=0)
    model = build_model(config).eval()
    cfg = GRPOConfig(steps=1000, prompts_per_step=prompts, num_generations=generations, max_completion_length=max_len,
                     max_prompt_length=prompt_len, learning_rate=1e-5, template="r1-zero", temperature=1.0,
                     seed=seed, micro_batch_size=micro_batch_size, loss_type="dapo")
    trainer = GRPOTrainer(model, tok, cfg, digit_share, QUESTIONS)
    llm = trainer.llm
    generate = llm.generate
    stops = stop_ids(max_len, vocab_size)

    def patched(prompt_ids, params, *a, **k):  # noqa: ANN001, ANN202
        change = dict(ignore_eos=True) if fixed else dict(stop_token_ids=stops)
        return generate(prompt_ids, [dataclasses.replace(p, **change) for p in params], *a, **k)

    llm.generate = patched
    return trainer


def padded_optimise(trainer: GRPOTrainer, batch: RolloutBatch, advantages: torch.Tensor, mask: torch.Tensor) -> None:
    """The training pass before issue 17 (GRPOTrainer._optimise and completion_logprobs as they were)."""
    cfg, model = trainer.config, trainer.model
    N, L = batch.completion_ids.shape
    total_tokens = mask.sum().clamp(min=1)
    mb = cfg.micro_batch_size
    trainer.optimizer.zero_grad(set_to_none=True)
    for s in range(0, N, mb):
        part = batch.select(torch.zeros(N, dtype=torch.bool).index_fill_(0, torch.arange(s, min(s + mb, N)), True))
        m = mask[s : s + mb]
        ids = part.input_ids
        hidden = model.model(ids)
        pos = (part.completion_start[:, None] - 1 + torch.arange(L)[None, :]).clamp(max=ids.shape[1] - 1)
        picked = hidden.gather(1, pos[:, :, None].expand(-1, -1, hidden.shape[-1]))
        logp = (model.lm_head(picked).float() / cfg.temperature).log_softmax(-1)
        logprobs = logp.gather(2, part.completion_ids[:, :, None]).squeeze(2)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
        loss, _ = grpo_loss(logprobs, part.old_logprobs, advantages[s : s + mb], m, loss_type=cfg.loss_type,
                            epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                            max_completion_length=m.shape[1])
        (loss * (m.sum() / total_tokens)).backward()
        (entropy * m).sum().item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    trainer.optimizer.step()


def train_inputs(trainer: GRPOTrainer, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return group_advantages(batch.rewards, trainer.config.num_generations, trainer.config.scale_rewards), \
        batch.completion_mask.clone()


def timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="32,64,256", help="max completion lengths, comma-separated")
    ap.add_argument("--modes", default="natural,fixed")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2, help="timed steps per setting (median), after one warm-up")
    ap.add_argument("--profile", choices=["rollout", "train", "train-old"], default=None,
                    help="print torch.profiler's top ops of one rollout or one training pass (new / old) instead")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; preset {args.preset} "
          f"(vocab {args.vocab_size}), {args.prompts} prompts x {args.generations} completions, prompt "
          f"{args.prompt_len} tokens, micro_batch_size {args.micro_batch_size}, loss dapo")
    header = (f"{'mode':8} {'max':>4} {'mean len':>8} {'rollout s':>9} {'tok/s':>7} | {'train s old':>11} "
              f"{'train s new':>11} {'new/old':>7} | {'mbs old':>7} {'mbs new':>7} | {'step s old':>10} "
              f"{'step s new':>10} {'new/old':>7}")
    if not args.profile:
        print(header)
    for mode in args.modes.split(","):
        for max_len in (int(x) for x in args.lengths.split(",")):
            trainer = build(max_len, mode == "fixed", args.prompts, args.generations, args.micro_batch_size,
                            args.preset, args.vocab_size, args.prompt_len)
            examples = trainer._next_examples(args.prompts)
            if args.profile:
                profile(trainer, examples, max_len, args.profile)
                continue
            rollouts, olds, news, lengths = [], [], [], []
            for r in range(args.repeats + 1):
                trainer.model.eval()
                t = time.perf_counter()
                batch = trainer.rollout(examples, max_len, seed=r)
                rollout_s = time.perf_counter() - t
                advantages, mask = train_inputs(trainer, batch)
                trainer.model.train()
                new_s = timed(lambda: trainer._optimise(batch, advantages, mask, None))
                old_s = timed(lambda: padded_optimise(trainer, batch, advantages, mask))
                trainer.llm.update_weights(trainer.model)
                if r:  # the first round warms up
                    rollouts.append(rollout_s), olds.append(old_s), news.append(new_s)
                    lengths.append(batch.completion_mask.sum().item() / batch.num_completions)
            mbs_old = -(-batch.num_completions // args.micro_batch_size)
            mbs_new = mbs_old
            if token_budget_micro_batches is not None:
                lengths_t = batch.row_lengths()
                mbs_new = len(token_budget_micro_batches(lengths_t, args.micro_batch_size * int(lengths_t.max())))
            ro, old, new = (statistics.median(x) for x in (rollouts, olds, news))
            tokens = statistics.mean(lengths) * batch.num_completions
            print(f"{mode:8} {max_len:4d} {statistics.mean(lengths):8.1f} {ro:9.2f} {tokens / ro:7.0f} | "
                  f"{old:11.2f} {new:11.2f} {new / old:7.2f} | {mbs_old:7d} {mbs_new:7d} | {ro + old:10.2f} "
                  f"{ro + new:10.2f} {(ro + new) / (ro + old):7.2f}", flush=True)
            trainer.llm.shutdown()


def profile(trainer: GRPOTrainer, examples: list[dict[str, Any]], max_len: int, what: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    batch = trainer.rollout(examples, max_len, seed=0)  # warm-up
    advantages, mask = train_inputs(trainer, batch)
    trainer.model.train()
    trainer._optimise(batch, advantages, mask, None)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        if what == "rollout":
            trainer.model.eval()
            trainer.rollout(examples, max_len, seed=1)
        elif what == "train-old":
            padded_optimise(trainer, batch, advantages, mask)
        else:
            trainer._optimise(batch, advantages, mask, None)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
