"""Worker (run by tests/test_parallel.py under torchrun): a parallelized tiny MoE model vs the same model on
one device, forward and backward on the same global batch, then one router-bias update.

Every rank builds the reference from the same seed and runs it over the whole batch; the parallel model sees
only this rank's rows. Writes OUT/rank-R.json with the largest relative errors it measured.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
from torch.distributed.tensor import DTensor

from r1forge.config import ModelConfig
from r1forge.model import build_model
from r1forge.parallel import ParallelConfig, init_parallel, parallelize
from r1forge.train.balance import ExpertLoadTracker, update_router_biases


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def main(out_dir: str, dp_shard: int, ep: int) -> None:
    mesh = init_parallel(ParallelConfig(dp_shard=dp_shard, ep=ep))
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=96, num_hidden_layers=3, n_routed_experts=8)
    reference = build_model(config)
    model = parallelize(copy.deepcopy(reference), mesh)
    B, T = 2 * mesh.world_size, 12
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    mine = ids.chunk(mesh.world_size)[mesh.rank]

    ref_logits = reference(ids)
    ref_loss = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), ids.roll(-1, 1).flatten(), reduction="sum")
    (ref_loss / ids.numel()).backward()
    logits = model(mine)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mine.roll(-1, 1).flatten(), reduction="sum")
    (loss / ids.numel()).backward()  # the global token count: summed gradients are the global batch's

    errors = {"logits": rel(logits.detach(), ref_logits.detach().chunk(mesh.world_size)[mesh.rank])}
    ref_grads = dict(reference.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        errors[name] = rel(grad, ref_grads[name].grad)
        checked += 1

    tracker = ExpertLoadTracker(model)
    tracker.collect()
    loads = mesh.all_reduce_(tracker.step_loads())
    update_router_biases(model, 0.01, loads)
    ref_tracker = ExpertLoadTracker(reference)
    ref_tracker.collect()
    update_router_biases(reference, 0.01, ref_tracker.step_loads())
    biases = [layer.gate.e_score_correction_bias for layer in tracker.layers]
    ref_biases = [layer.gate.e_score_correction_bias for layer in ref_tracker.layers]
    bias_error = max(float((b - r).abs().max()) for b, r in zip(biases, ref_biases, strict=True))
    result = {"errors": errors, "checked": checked, "bias_error": bias_error,
              "biases": [b.tolist() for b in biases], "loads": [x.tolist() for x in loads]}
    with open(os.path.join(out_dir, f"rank-{mesh.rank}.json"), "w") as f:
        json.dump(result, f)
    mesh.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
