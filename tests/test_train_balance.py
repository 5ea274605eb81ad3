"""Auxiliary-loss-free load balancing: the bias rule, loads summed over micro-batches, and that it balances.

The end-to-end test skews two experts' router weights towards the mean router input, so nearly every token
picks them (max/mean load close to E/K = 4), then trains the same model with and without the bias update.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r1forge import ModelConfig, build_model
from r1forge.data import PretrainDataset, StatefulLoader, load_tokenizer, make_pretrain_corpus, train_tokenizer
from r1forge.train import (
    ExpertLoadTracker, LogConfig, TrainConfig, Trainer, enable_activation_checkpointing, load_ratios, read_metrics,
    update_router_biases,
)
from r1forge.train.balance import aux_loss, load_fractions, set_aux_loss_alpha

VOCAB = 320


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PretrainDataset:
    out = tmp_path_factory.mktemp("tok")
    texts = make_pretrain_corpus(200, 0)
    train_tokenizer(None, out, vocab_size=VOCAB, texts=texts)
    return PretrainDataset(load_tokenizer(out), 32, texts=texts, seed=0)


def _model(vocab_size: int, seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("tiny", vocab_size=vocab_size, num_nextn_predict_layers=0, **overrides)
    return build_model(config)


def test_bias_update_rule() -> None:
    model = build_model(ModelConfig.from_preset("tiny", vocab_size=64), with_mtp=True)
    layers = model.moe_layers()
    assert len(layers) == 2  # layer 1 and the MTP module
    loads = [torch.tensor([10.0, 0, 2, 4, 4, 4, 4, 4]), torch.tensor([4.0] * 8)]  # mean 4
    assert update_router_biases(model, 0.5, loads) == 2
    assert layers[0].gate.e_score_correction_bias.tolist() == [-0.5, 0.5, 0.5, 0, 0, 0, 0, 0]
    assert layers[1].gate.e_score_correction_bias.tolist() == [0.0] * 8
    assert not any(p is layers[0].gate.e_score_correction_bias for p in model.parameters())  # a buffer
    with pytest.raises(ValueError, match="MoE layers"):
        update_router_biases(model, 0.5, loads[:1])


def test_bias_update_skips_routers_without_bias() -> None:
    model = _model(64, topk_method="greedy", n_group=1, topk_group=1)
    model(torch.randint(0, 64, (1, 8)))
    assert update_router_biases(model, 0.1) == 0


def test_tracker_sums_micro_batches_once_with_activation_checkpointing() -> None:
    model = _model(64)
    enable_activation_checkpointing(model)
    tracker = ExpertLoadTracker(model)
    total = torch.zeros(8, dtype=torch.float64)
    for seed in range(3):
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
        model(ids).sum().backward()  # the backward recomputes each layer's forward
        tracker.collect()
        total += model.moe_layers()[0].tokens_per_expert.double()
    (loads,) = tracker.step_loads()
    assert torch.equal(loads, total)
    assert loads.sum() == 3 * 2 * 16 * 2  # tokens x top-k, counted once
    tracker.end_step()
    assert tracker.step_loads() is None
    assert torch.equal(tracker.pop_interval()[0], total)
    assert load_ratios([torch.tensor([4.0, 4, 4, 4])]) == [1.0]
    assert load_ratios([torch.tensor([8.0, 0, 0, 0])]) == [4.0]
    assert load_fractions([torch.tensor([6.0, 2])]) == [[1.5, 0.5]]


def test_sequence_aux_loss_trains_the_router() -> None:
    model = _model(64)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids)
    assert aux_loss(model) is None
    set_aux_loss_alpha(model, 0.01)
    model(ids)
    loss = aux_loss(model)
    assert loss is not None and loss.item() > 0
    loss.backward()
    assert model.moe_layers()[0].gate.weight.grad.abs().sum() > 0


def _skewed_model(dataset: PretrainDataset) -> torch.nn.Module:
    """Experts 0 and 1 of every MoE layer get +4 logits (on average) over the others: routing collapses."""
    model = _model(VOCAB)
    inputs = []
    hooks = [layer.gate.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
             for layer in model.moe_layers()]
    with torch.no_grad():
        model(next(StatefulLoader(dataset, 8, seed=1))["input_ids"])
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for layer, x in zip(model.moe_layers(), inputs, strict=True):
            mu = x.mean(0)
            layer.gate.weight[:2] += 4 * mu / mu.pow(2).sum()
    return model


def _ratios(dataset: PretrainDataset, gamma: float, run_dir: Path) -> list[float]:
    model = _skewed_model(dataset)
    config = TrainConfig(steps=40, batch_size=8, lr=1e-3, warmup_steps=1, bias_update_gamma=gamma, mtp_lambda=0.0)
    log = LogConfig(log_every=5, eval_every=0, save_every=0, progress=False, tensorboard=False)
    Trainer(model, StatefulLoader(dataset, 8, seed=0), config, log, run_dir).fit()
    return [r["load_max_mean"] for r in read_metrics(run_dir) if "load_max_mean" in r]


def test_bias_update_balances_a_collapsed_router(dataset: PretrainDataset, tmp_path: Path) -> None:
    without = _ratios(dataset, 0.0, tmp_path / "without")
    with_bias = _ratios(dataset, 0.01, tmp_path / "with")
    assert without[0] > 3.0 and with_bias[0] > 3.0  # starts collapsed (E/K = 4 is total collapse)
    assert without[-1] > 0.9 * without[0]  # no bias update: stays collapsed
    assert with_bias[-1] < 1.6  # bias update: close to balanced
    assert with_bias[-1] < 0.5 * without[-1]
