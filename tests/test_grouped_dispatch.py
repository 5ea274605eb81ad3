"""GroupedDispatch (torch._grouped_mm over stacked expert weights, the default) agrees with SortedDispatch (the
reference loop) in the forward and the backward, leaves unchosen experts without a gradient as the loop does, and
keeps the checkpoint's per-expert keys."""

from __future__ import annotations

import copy

import pytest
import torch

from r1forge import ModelConfig, build_model
from r1forge.model.moe import DeepseekMoE, GroupedDispatch, SortedDispatch, grouped_dispatch_supported

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this PyTorch has no torch._grouped_mm")


def _layer(seed: int = 0) -> DeepseekMoE:
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("tiny", n_routed_experts=8, num_experts_per_tok=2)
    layer = DeepseekMoE(config)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return layer


def test_grouped_is_the_default_and_runs_the_grouped_kernel() -> None:
    layer = _layer()
    assert isinstance(layer.dispatch, GroupedDispatch)
    assert grouped_dispatch_supported(torch.zeros(3, layer.config.hidden_size), layer.experts)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts per Linear: the reference loop's job
        assert not grouped_dispatch_supported(torch.zeros(3, layer.config.hidden_size), layer.experts)


@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_grouped_forward_and_backward_equal_the_sorted_loop(tokens: int, with_grad: bool) -> None:
    """with_grad: the grouped kernels and their hand-written backward; without (the default), the loop under
    autograd and the grouped kernels only in inference mode."""
    grouped = _layer()
    grouped.dispatch = GroupedDispatch(with_grad=with_grad)
    sorted_ = copy.deepcopy(grouped)
    sorted_.dispatch = SortedDispatch()
    x = torch.randn(2, tokens, grouped.config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [m(xi) for m, xi in zip((grouped, sorted_), xs)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    w = torch.randn_like(outs[0])
    for out in outs:
        (out * w).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-5, rtol=1e-5)
    used = grouped.tokens_per_expert > 0
    if tokens == 1:
        assert not used.all()  # 2 tokens x top-2: some experts unchosen
    ref = dict(sorted_.named_parameters())
    for name, p in grouped.named_parameters():
        want = ref[name].grad
        if want is None:  # an unchosen expert: no gradient on either path (AdamW skips it)
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, want, atol=1e-5, rtol=1e-5, msg=name)
    with torch.no_grad():  # ref-model / evaluation forwards: stacked for the call
        torch.testing.assert_close(grouped(x), sorted_(x), atol=1e-5, rtol=1e-5)
    assert not hasattr(grouped.experts, "_stacked")
    with torch.inference_mode():  # the engine's path: weights stacked in place, same outputs
        torch.testing.assert_close(grouped(x), sorted_(x), atol=1e-5, rtol=1e-5)
    assert grouped.experts[0].gate_proj.weight.data_ptr() == grouped.experts._stacked[0].data_ptr()


def test_checkpoint_keys_and_training_are_unchanged_by_the_stacking(tmp_path) -> None:  # noqa: ANN001
    """After the engine stacked the experts in place, the per-expert keys save and load as before, and training
    steps move the same parameters (the stack is their storage)."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", num_nextn_predict_layers=0)
    model = build_model(config)
    keys = set(model.state_dict())
    with torch.inference_mode():
        model(torch.randint(0, config.vocab_size, (2, 5)))
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    from r1forge import load_model

    loaded = load_model(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expert = model.moe_layers()[0].experts
    before = [e.gate_proj.weight.detach().clone() for e in expert]
    model(torch.randint(0, config.vocab_size, (2, 9))).square().mean().backward()  # logits [B, T, V]
    opt.step()
    moved = [not torch.equal(b, e.gate_proj.weight) for b, e in zip(before, expert)]
    assert any(moved)
    stacked = expert._stacked[0]
    for e, w in zip(expert, stacked):  # the update went into the stack's storage
        assert torch.equal(e.gate_proj.weight, w[: e.gate_proj.weight.shape[0]])
