"""`make demo`: the DeepSeek-R1 recipe end to end on a laptop CPU, with nothing downloaded.

Recipe "r1" (the default), each stage cached under OUT_DIR (a second run skips finished ones, an interrupted one
resumes):
  1. tokenizer + pretraining: a tiny MLA + DeepSeekMoE model on the built-in arithmetic corpus (worked problems
     of 1 to 5 chained operations);
  2. cold-start SFT: `<think>` / `<answer>` conversations that write the steps out for half of the problems and
     answer tersely (empty reasoning) for the other half, whatever their difficulty;
  3. evaluation before RL: greedy accuracy, format rate and response length on held-out test-split problems
     (never in any training data), per number of steps, and sampled pass@1 / pass@k;
  4. GRPO with the accuracy + format rewards (nothing pays for length), held-out evaluation every few steps;
  5. evaluation after RL on the same problems: the before/after table, per difficulty, a sample trace per
     difficulty, the plots;
  6. distillation (R1 section 4.1): the RL-trained teacher's correct traces into a small dense Qwen2-shaped
     student, against the same student trained by RL alone for the same CPU time.

Why the task is built this way: a written-out step costs tokens but makes a multi-step problem solvable for a
1.5M-parameter model, while a terse answer to a 4-step problem is mostly a guess. The cold start shows both
behaviours without saying when to use which; RL finds that writing the steps out pays on the problems that need
it, so accuracy and reasoning length rise together on those (DeepSeek-R1 figures 2-3), from reward alone.

Recipe "r1-zero": RL straight from the pretrained base with the R1-Zero template (no cold start); same table.
"""

from r1forge.demo.recipes import RECIPES, run_demo, stage_configs

__all__ = ["RECIPES", "run_demo", "stage_configs"]
