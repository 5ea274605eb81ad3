"""MoE dispatchers side by side on one layer, in one run: the per-expert loop as it was before issue 17 (slice
assignment into one buffer, whose backward zero-fills an [N, D] per expert), the loop now (`SortedDispatch`:
split + cat) and `GroupedDispatch` (torch._grouped_mm over stacked weights), in the engine's inference mode and
forward + backward (GroupedDispatch(with_grad=True); the default runs the loop there).

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_dispatch.py                  # `small` preset layer, fp32 CPU
    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_dispatch.py --preset tiny-demo --tokens 32,128,1024

Times are process CPU seconds (median), so that other work on a shared host weighs less than in wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from r1forge import ModelConfig
from r1forge.model.moe import DeepseekMoE, GroupedDispatch, SortedDispatch, combine_copies, sort_copies


class SliceLoopDispatch:
    """SortedDispatch before issue 17."""

    def __call__(self, x, ids, weights, experts):  # noqa: ANN001, ANN204
        order, token_of_copy, counts = sort_copies(ids, len(experts))
        x_sorted = x[token_of_copy]
        out = torch.empty_like(x_sorted)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                out[start : start + n] = experts[e](x_sorted[start : start + n])
                start += n
        return combine_copies(x, out, order, token_of_copy, weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", default="32,128,1024,6400", help="token counts; each is timed both ways")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    cfg = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    moe = DeepseekMoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    print(f"MoE layer of {args.preset} (D {cfg.hidden_size}, {cfg.n_routed_experts} experts top-"
          f"{cfg.num_experts_per_tok}, F {cfg.moe_intermediate_size}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats} (process CPU ms)")
    print(f"{'tokens':>6} {'pass':>15} | {'loop before':>11} {'loop now':>9} {'grouped':>8} | "
          f"{'now/before':>10} {'grouped/before':>14}")
    dispatchers = {"before": SliceLoopDispatch(), "now": SortedDispatch(), "grouped": GroupedDispatch(with_grad=True)}
    for grad in (False, True):
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, cfg.hidden_size, requires_grad=grad)
            times: dict[str, list[float]] = {k: [] for k in dispatchers}

            def run() -> None:
                if grad:
                    moe(x).square().sum().backward()
                else:
                    with torch.inference_mode():
                        moe(x)

            for i in range(args.repeats + 1):  # interleaved, the first round warms up
                for name, d in dispatchers.items():
                    moe.dispatch = d
                    t = time.process_time()
                    run()
                    if i:
                        times[name].append(time.process_time() - t)
            m = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"{T:6d} {'fwd+bwd' if grad else 'fwd, inference':>15} | {m['before']:9.2f}ms {m['now']:7.2f}ms "
                  f"{m['grouped']:6.2f}ms | {m['now'] / m['before']:10.2f} {m['grouped'] / m['before']:14.2f}")


if __name__ == "__main__":
    main()
