"""r1forge's GRPO step against TRL's GRPOTrainer (transformers generate for the rollouts), same weights, same
prompts, same G and lengths, in one run. TRL is not a dependency of r1forge: run this with a Python that has
`trl` installed beside r1forge's requirements (e.g. a separate virtual environment), and r1forge on PYTHONPATH.

    OMP_NUM_THREADS=1 PYTHONPATH=. /path/to/trl-venv/bin/python bench/grpo_trl.py --lengths 32,64 --steps 2

The policy is bench/grpo.py's (random `small`-shaped DeepSeek, saved with save_pretrained and loaded by
transformers as DeepseekV3ForCausalLM); both sides share one character-level tokenizer. TRL: no vLLM,
per_device_train_batch_size = r1forge's micro_batch_size, gradient accumulation over the whole batch (one
generation and one optimizer step per step), loss_type dapo, beta 0. Natural lengths: both stop on bench/grpo.py's
stop tokens; fixed: r1forge ignore_eos, TRL min_new_tokens = max length. Rollout seconds are r1forge's
`rollout` and TRL's `_generate_and_score_completions`; training seconds the rest of the step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo as r1bench  # noqa: E402  bench/grpo.py

from r1forge.data.synthetic import R1_ZERO_TEMPLATE  # noqa: E402


def char_tokenizer(vocab_size: int):  # noqa: ANN201
    """A transformers fast tokenizer, one token per character: ids 0 pad, 1 bos, 2 eos, 3 unk, then ASCII, then
    filler tokens up to vocab_size (which decode to one character each, so random completions have text)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    alphabet = r1bench.ALPHABET
    i = 0
    while len(vocab) < vocab_size:
        vocab[f"{alphabet[i % len(alphabet)]}\u200b{i}"] = len(vocab)  # distinct names, printable first character
        i += 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def r1forge_step_times(trainer, examples, max_len: int, steps: int) -> tuple[float, float, float]:  # noqa: ANN001
    rollouts, trains, lengths = [], [], []
    for r in range(steps + 1):
        trainer.model.eval()
        t = time.perf_counter()
        batch = trainer.rollout(examples, max_len, seed=r)
        rollout_s = time.perf_counter() - t
        advantages, mask = r1bench.train_inputs(trainer, batch)
        trainer.model.train()
        t = time.perf_counter()
        trainer._optimise(batch, advantages, mask, None)
        trainer.llm.update_weights(trainer.model)
        train_s = time.perf_counter() - t
        if r:
            rollouts.append(rollout_s), trains.append(train_s)
            lengths.append(batch.completion_mask.sum().item() / batch.num_completions)
    return statistics.median(rollouts), statistics.median(trains), statistics.mean(lengths)


def trl_step_times(model_dir: str, tok, prompts: list[str], args, max_len: int, fixed: bool,  # noqa: ANN001
                   steps: int) -> tuple[float, float, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stops = r1bench.stop_ids(max_len, args.vocab_size)
    model.generation_config.eos_token_id = [tok.eos_token_id] + ([] if fixed else stops)
    n_rows = args.prompts * args.generations
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=n_rows // args.micro_batch_size, num_generations=args.generations,
            max_completion_length=max_len, temperature=1.0, learning_rate=1e-5, beta=0.0, loss_type="dapo",
            max_steps=steps + 1, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
            seed=0, dataloader_num_workers=0, disable_tqdm=True,
            generation_kwargs={"min_new_tokens": max_len} if fixed else None,
        )
        data = Dataset.from_dict({"prompt": [p for p in prompts for _ in range(max(1, steps + 1))]})

        def reward(completions, **kwargs):  # noqa: ANN001, ANN003, ANN202
            return [r1bench.digit_share("", c)[0] for c in completions]

        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                              processing_class=tok)
        gen_times: list[float] = []
        step_times: list[float] = []
        lengths: list[float] = []
        generate = trainer._generate_and_score_completions

        def timed_generate(batch):  # noqa: ANN001, ANN202
            t = time.perf_counter()
            out_batch = generate(batch)
            gen_times.append(time.perf_counter() - t)
            lengths.append(out_batch["completion_mask"].sum().item() / out_batch["completion_mask"].shape[0])
            return out_batch

        trainer._generate_and_score_completions = timed_generate

        class StepTimer(TrainerCallback):
            def on_step_begin(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
                self.t = time.perf_counter()

            def on_step_end(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
                step_times.append(time.perf_counter() - self.t)

        trainer.add_callback(StepTimer())
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # its per-step metric dicts
        trainer.train()
    gens, totals = gen_times[1:], step_times[1:]  # the first step warms up
    train = statistics.median([s - g for s, g in zip(totals, gens)])
    return statistics.median(gens), train, statistics.mean(lengths[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="32,64")
    ap.add_argument("--modes", default="natural,fixed")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per setting (median), after one warm-up")
    args = ap.parse_args()
    import transformers
    import trl

    import warnings

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    tok = char_tokenizer(args.vocab_size)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{torch.get_num_threads()} threads; small preset (vocab {args.vocab_size}), {args.prompts} prompts x "
          f"{args.generations}, prompt {args.prompt_len} tokens, micro-batch {args.micro_batch_size}")
    print(f"{'mode':8} {'max':>4} | {'r1forge len':>11} {'rollout s':>9} {'train s':>7} {'step s':>6} | "
          f"{'TRL len':>7} {'rollout s':>9} {'train s':>7} {'step s':>6} | {'rollout x':>9} {'train x':>7} "
          f"{'step x':>6}")
    for mode in args.modes.split(","):
        for max_len in (int(x) for x in args.lengths.split(",")):
            fixed = mode == "fixed"
            trainer = r1bench.build(max_len, fixed, args.prompts, args.generations, args.micro_batch_size,
                                    "small", args.vocab_size, args.prompt_len, tokenizer=tok)
            examples = trainer._next_examples(args.prompts)
            prompts = []
            for ex in examples:
                text = R1_ZERO_TEMPLATE.format(question=ex["question"])
                prompts.append(text[-args.prompt_len:])  # what r1forge keeps (the last prompt_len tokens)
            with tempfile.TemporaryDirectory() as d:
                trainer.model.save_pretrained(d)
                tok.save_pretrained(d)
                theirs = trl_step_times(d, tok, prompts, args, max_len, fixed, args.steps)
            ours = r1forge_step_times(trainer, examples, max_len, args.steps)
            trainer.llm.shutdown()
            (ro, tr, ln), (tro, ttr, tln) = ours, theirs
            print(f"{mode:8} {max_len:4d} | {ln:11.1f} {ro:9.2f} {tr:7.2f} {ro + tr:6.2f} | {tln:7.1f} {tro:9.2f} "
                  f"{ttr:7.2f} {tro + ttr:6.2f} | {tro / ro:8.2f}x {ttr / tr:6.2f}x {(tro + ttr) / (ro + tr):5.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
