"""Speculative decoding with the MTP module: lossless (greedy token for token, sampled in distribution), cache
accounting after rejections, logprobs, stops, fallbacks, and the configuration's errors.

A randomised MTP head drafts badly (its drafts are almost always rejected), so the greedy tests also run with
an "oracle" drafter: after the real MTP drafting (whose cache writes stay exercised), the drafts are replaced
by the plain engine's continuation with one token spoiled at a position that cycles with every draft, so that
full acceptance, partial acceptance and immediate rejection all occur.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import r1forge
from conftest import randomise_
from r1forge import LLM, SamplingParams
from r1forge.engine.config import SpeculativeConfig
from r1forge.engine import speculative
from r1forge.engine.rejection_sampler import greedy_accept, rejection_sample

VOCAB = 64


def _model(vocab: int = VOCAB, seed: int = 0, std: float = 0.3) -> r1forge.DeepseekForCausalLM:
    torch.manual_seed(seed)
    cfg = r1forge.ModelConfig.from_preset("tiny", vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=256,
                                          num_nextn_predict_layers=1)
    return randomise_(r1forge.build_model(cfg, with_mtp=True), std=std, seed=seed).eval()


@pytest.fixture(scope="module")
def model() -> r1forge.DeepseekForCausalLM:
    return _model()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    from r1forge.data import make_pretrain_corpus, train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(None, out, vocab_size=300, texts=make_pretrain_corpus(200, 0))
    return out


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _spec(k: int, **extra) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k, **extra}


def _oracle(monkeypatch, references: dict[tuple[int, ...], list[int]]) -> None:
    """Replace greedy drafts by the reference continuation, spoiling position (draft number mod k + 1)."""
    real_draft = speculative.SpeculativeDecoder.draft
    counter = itertools.count()

    def draft(self, rows, hidden, max_model_len):
        real_draft(self, rows, hidden, max_model_len)
        for r in rows:
            seq = r.seq
            if not seq.draft_token_ids or not seq.params.greedy:
                continue
            k = len(seq.draft_token_ids)
            ref = references[tuple(seq.token_ids[: seq.num_prompt_tokens])]
            done = seq.num_output_tokens
            tokens = list(ref[done : done + k])
            spoil = next(counter) % (k + 1)
            if spoil < k:
                tokens[spoil] = (tokens[spoil] + 1) % VOCAB
            seq.draft_token_ids = tokens

    monkeypatch.setattr(speculative.SpeculativeDecoder, "draft", draft)


# ---------------------------------------------------------------------- configuration
def test_config_validation_and_missing_mtp(tmp_path):
    cfg = r1forge.engine.EngineConfig(speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    assert cfg.speculative_config == SpeculativeConfig("mtp", 2)
    with pytest.raises(ValueError, match="method must be 'mtp'"):
        SpeculativeConfig(method="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="unknown speculative_config key"):
        SpeculativeConfig.from_dict({"method": "mtp", "num_spec_tokens": 2})
    torch.manual_seed(0)
    plain_cfg = r1forge.ModelConfig.from_preset("tiny", vocab_size=VOCAB, num_hidden_layers=2,
                                                max_position_embeddings=256, num_nextn_predict_layers=0)
    plain = r1forge.build_model(plain_cfg)
    with pytest.raises(ValueError, match="MTP module"):
        LLM(plain, speculative_config=_spec(1))
    plain.save_pretrained(tmp_path / "no_mtp")
    with pytest.raises(ValueError, match="no_mtp"):
        LLM(str(tmp_path / "no_mtp"), speculative_config=_spec(1))


def test_checkpoint_with_mtp_loads_and_drafts(tmp_path, model):
    model.save_pretrained(tmp_path / "ckpt")
    llm = LLM(str(tmp_path / "ckpt"), speculative_config=_spec(2), block_size=16, num_blocks=32)
    assert llm.model.num_mtp == 1
    assert torch.equal(llm.model.model.mtp[0].eh_proj.weight, model.model.mtp[0].eh_proj.weight)
    prompt = _prompts([9])[0]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert llm.generate([prompt], params)[0].token_ids == LLM(model, block_size=16, num_blocks=32).generate([prompt], params)[0].token_ids


# ---------------------------------------------------------------------- the acceptance rule
def test_greedy_accept():
    assert greedy_accept([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert greedy_accept([5, 9, 7], [5, 6, 7, 8]) == [5, 6]
    assert greedy_accept([9, 6], [5, 6, 7]) == [5]


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed counts against probabilities; cells expecting < 5 are pooled into one."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs, exp = counts[~small].double(), expected[~small]
    if expected[small].sum() > 1e-9:
        obs = torch.cat([obs, counts[small].sum().double()[None]])
        exp = torch.cat([exp, expected[small].sum()[None]])
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.double), stat / 2))


def test_rejection_sample_follows_target_distribution():
    """Emitted first and second tokens are distributed as p, whatever q the drafts came from."""
    g = torch.Generator().manual_seed(0)
    V, trials = 5, 3000
    p = torch.rand(3, V, generator=g).pow(3)
    p /= p.sum(-1, keepdim=True)
    q = torch.rand(2, V, generator=g)
    q /= q.sum(-1, keepdim=True)
    first = torch.zeros(V)
    lengths = torch.zeros(4)
    for _ in range(trials):
        drafts = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
        out = rejection_sample(drafts, q, p, g)
        first[out[0]] += 1
        lengths[len(out)] += 1
    assert _chi_square_pvalue(first, p[0]) > 1e-3
    expected_accept = torch.minimum(p[0], q[0]).sum()  # P(accept draft 1) = sum_x min(p, q)
    assert abs(float(lengths[2:].sum() / trials) - float(expected_accept)) < 0.03
    assert lengths[1] > 0 and lengths[3] > 0  # rejections and full acceptance both happened


# ---------------------------------------------------------------------- lossless greedy in the engine
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_equals_plain_decode(model, monkeypatch, k):
    shared = _prompts([40], seed=7)[0]
    prompts = _prompts([5, 17, 33], seed=k) + [shared + [3], shared + [4, 5, 6]]  # two share 2 blocks
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=2, n=n)
              for m, n in zip([20, 23, 9, 25, 16], [1, 2, 1, 1, 3])]
    plain = LLM(model, block_size=16, num_blocks=64).generate(prompts, params)
    _oracle(monkeypatch, {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, plain)})
    llm = LLM(model, block_size=16, num_blocks=64, speculative_config=_spec(k))
    out = llm.generate(prompts[:4], params[:4]) + llm.generate(prompts[4:], params[4:])  # the last reuses 2 blocks
    for a, b, sp in zip(plain, out, params):
        assert len(b.outputs) == sp.n
        for ca, cb in zip(a.outputs, b.outputs):
            assert cb.token_ids == ca.token_ids and len(cb.token_ids) == sp.max_tokens
            torch.testing.assert_close(torch.tensor(cb.logprobs), torch.tensor(ca.logprobs), atol=1e-5, rtol=0)
            assert [sorted(t) for t in cb.top_logprobs] == [sorted(t) for t in ca.top_logprobs]
    stats = llm.stats()
    assert stats["cache_blocks_used"] == 0 and stats["prefix_hit_tokens"] >= 32
    assert 0 < stats["spec_acceptance_rate"] < 1  # both outcomes exercised
    assert stats["spec_mean_accepted_length"] > 1
    assert stats["generated_tokens"] == sum(sp.max_tokens * sp.n for sp in params)


def test_greedy_with_real_mtp_drafts_and_preemption(model):
    """The randomised MTP head's own drafts, a pool small enough to preempt: still the plain output."""
    prompts = _prompts([6, 11, 19, 23, 30, 8])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = LLM(model, block_size=16).generate(prompts, params)
    llm = LLM(model, block_size=16, num_blocks=10, speculative_config=_spec(3))
    out = llm.generate(prompts, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    stats = llm.stats()
    assert stats["preemptions"] > 0 and stats["cache_blocks_used"] == 0 and stats["spec_draft_tokens"] > 0


def test_stops_penalties_and_abort(model, monkeypatch):
    """Stop tokens inside accepted drafts end the completion there; penalised requests decode plainly; an
    abort between steps (drafts pending) frees every block."""
    prompt = _prompts([8], seed=3)[0]
    free_params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    free = LLM(model, block_size=16).generate([prompt], free_params)[0].token_ids
    _oracle(monkeypatch, {tuple(prompt): free})
    llm = LLM(model, block_size=16, speculative_config=_spec(3))
    stop_at = free[7]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free[: free.index(stop_at) + 1]
    penalised = SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True, frequency_penalty=1.5)
    before = llm.stats()["spec_draft_tokens"]
    assert llm.generate([prompt], penalised)[0].token_ids == \
        LLM(model, block_size=16).generate([prompt], penalised)[0].token_ids
    assert llm.stats()["spec_draft_tokens"] == before  # never drafted
    rid = llm.engine.add_request(prompt, free_params)
    for _ in range(3):
        llm.engine.step()
    assert llm.engine.requests[rid].seqs[0].draft_token_ids
    llm.engine.abort(rid)
    assert llm.stats()["cache_blocks_used"] == 0


def test_stop_strings(model, monkeypatch):
    class CharTokenizer:
        eos_token_id = 1

        def encode(self, text: str) -> list[int]:
            return [ord(c) % VOCAB for c in text]

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(chr(65 + i % 26) for i in ids)

    tok = CharTokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    full = LLM(model, tokenizer=tok, block_size=16).generate(["hello"], params)[0]
    _oracle(monkeypatch, {tuple(tok.encode("hello")): full.token_ids})
    llm = LLM(model, tokenizer=tok, block_size=16, speculative_config=_spec(3))
    stop = full.text[10:12]
    out = llm.generate(["hello"], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == full.text[: full.text.find(stop)]
    streamed = list(llm.stream("hello", params))
    assert "".join(d.text for d in streamed) == full.text


def test_batch_size_policy_falls_back_to_plain_decode(model):
    prompts = _prompts([5, 9, 12])
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    llm = LLM(model, block_size=16, speculative_config=_spec(2, disable_by_batch_size=2))
    assert [o.token_ids for o in llm.generate(prompts, params)] == \
        [o.token_ids for o in LLM(model, block_size=16).generate(prompts, params)]
    drafted = llm.stats()["spec_draft_tokens"]
    llm.generate(prompts[:1], params)
    assert llm.stats()["spec_draft_tokens"] > drafted  # one running sequence: speculates again


# ---------------------------------------------------------------------- sampled output distribution
@pytest.mark.parametrize("temperature", [1.0, 0.7])  # 0.7: the demo's GRPO rollouts
def test_sampled_tokens_follow_the_target_distribution(temperature):
    """k = 2: the joint distribution of completion tokens 2 and 3 (the ones speculation produces) matches the
    target model's exact one at the same temperature, computed by enumerating tokens 1 and 2."""
    V = 12
    model = _model(vocab=V, seed=3, std=0.15)
    prompt = [2, 5, 7, 3]
    with torch.no_grad():
        p1 = (model(torch.tensor([prompt]))[0, -1] / temperature).softmax(-1)  # [V]
        ctx2 = torch.tensor([prompt + [a] for a in range(V)])
        p2 = (model(ctx2)[:, -1] / temperature).softmax(-1)  # [V(t1), V(t2)]
        ctx3 = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = (model(ctx3)[:, -1] / temperature).softmax(-1).view(V, V, V)  # [t1, t2, t3]
    joint23 = (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten()  # [V * V]
    llm = LLM(model, block_size=16, max_num_seqs=512, speculative_config=_spec(2))
    counts = torch.zeros(V * V)
    reqs = [SamplingParams(temperature=temperature, max_tokens=3, ignore_eos=True, n=200, seed=1000 * s)
            for s in range(12)]
    for out in llm.generate([prompt] * len(reqs), reqs):
        for c in out.outputs:
            counts[c.token_ids[1] * V + c.token_ids[2]] += 1
    stats = llm.stats()
    assert stats["spec_draft_tokens"] > 0 and 0 < stats["spec_acceptance_rate"] < 1
    assert stats["cache_blocks_used"] == 0
    assert _chi_square_pvalue(counts, joint23) > 1e-3


def test_seeded_sampling_is_reproducible(model):
    prompts = _prompts([7, 15])
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=11, logprobs=0)
    runs = [LLM(model, block_size=16, speculative_config=_spec(2)).generate(prompts, params) for _ in range(2)]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]
    # logprobs are the target's: recompute them with a full forward at temperature 1
    out = runs[0][0].outputs[0]
    with torch.no_grad():
        ids = torch.tensor([prompts[0] + out.token_ids])
        ref = model(ids)[0, len(prompts[0]) - 1 : -1].log_softmax(-1)
    want = ref.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- command line
def test_cli_speculative_config(tmp_path, tokenizer_dir, capsys):
    import json
    import shutil

    from r1forge.cli import main
    from r1forge.data import load_tokenizer

    out = tmp_path / "model"
    shutil.copytree(tokenizer_dir, out)
    tok = load_tokenizer(out)
    torch.manual_seed(0)
    cfg = r1forge.ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id, num_hidden_layers=2,
                                          max_position_embeddings=128)  # a small default pool
    randomise_(r1forge.build_model(cfg, with_mtp=True), std=0.3).save_pretrained(out)
    base = ["generate", str(out), "--prompt", "What is 2 + 3?", "--max-tokens", "8", "--json", "--device", "cpu"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(base + ["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}']) == 0
    assert json.loads(capsys.readouterr().out)["text"] == plain["text"]
    assert main(base + ["--speculative-config", '{"method": "ngram"}']) == 2
    assert "method must be 'mtp'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--speculative-config", "{not json"])
    assert "not valid JSON" in capsys.readouterr().err


def test_metrics_export_acceptance(model):
    from r1forge.serve.metrics import ServerMetrics

    llm = LLM(model, block_size=16, num_blocks=32, speculative_config=_spec(2))
    llm.generate(_prompts([9]), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    stats = llm.stats()
    text = ServerMetrics("tiny", engine_stats=llm.stats).render().decode()
    assert f'r1forge_spec_decode_num_draft_tokens_total{{model_name="tiny"}} {float(stats["spec_draft_tokens"])}' in text
    assert 'r1forge_spec_decode_acceptance_rate_per_pos{model_name="tiny",position="2"}' in text
    assert "r1forge_spec_decode_mean_acceptance_length" in text


# ---------------------------------------------------------------------- GRPO rollouts
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grpo_speculative_rollouts_keep_trainer_logprobs(tokenizer_dir, temperature):
    """pi_old from speculative rollouts (verified drafts, rejection sampling) is the trainer's policy."""
    from r1forge.data import load_tokenizer
    from r1forge.rl.config import GRPOConfig
    from r1forge.rl.trainer import GRPOTrainer
    from r1forge.rl.rollout import completion_logprobs

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    cfg = r1forge.ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                          num_hidden_layers=2)
    model = r1forge.build_model(cfg, with_mtp=True).eval()
    questions = [{"question": f"Compute {a} + {b}.", "answer": str(a + b)} for a, b in [(3, 4), (12, 7), (25, 30)]]
    gcfg = GRPOConfig(steps=1, prompts_per_step=3, num_generations=4, max_completion_length=16, learning_rate=1e-3,
                      template="r1-zero", temperature=temperature, seed=0, rollout_speculative_tokens=2)
    trainer = GRPOTrainer(model, tok, gcfg, lambda p, c, **e: (float(len(c) % 3), {}), questions)
    metrics = trainer.step()
    assert "rollout/spec_acceptance_rate_pos2" in metrics and "rollout_tokens_per_s" in metrics
    batch = trainer.rollout(questions, 16, seed=3)
    with torch.no_grad():
        recomputed, _ = completion_logprobs(model, batch, temperature)
    m = batch.completion_mask.bool()
    assert m.sum() > 30 and trainer.llm.stats()["spec_draft_tokens"] > 0
    assert (recomputed - batch.old_logprobs)[m].abs().max().item() < 1e-5
    plain = r1forge.build_model(cfg.replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="model.mtp"):
        GRPOTrainer(plain, tok, gcfg, lambda p, c, **e: (0.0, {}), questions)


# ---------------------------------------------------------------------- MTP stays trained
def test_distillation_trains_the_students_mtp_on_trained_tokens():
    from r1forge.distill.loss import ForwardKLLoss
    from r1forge.distill.student import build_student, dense_student_config
    from r1forge.train.loss import CausalLMLoss

    teacher = _model(seed=1)
    student = build_student(dense_student_config(teacher.config, num_hidden_layers=1, num_nextn_predict_layers=1))
    assert student.num_mtp == 1
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    labels[:, :4] = -100  # the prompt: not trained
    batch = {"input_ids": ids, "labels": labels}
    loss = ForwardKLLoss(teacher, mtp_lambda=0.3)
    norms = loss.normalizers(student, [batch])
    out = loss(student, batch, norms)
    out.loss.backward()
    assert student.model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    ce = CausalLMLoss(0.3)
    with torch.no_grad():
        ref = ce(student, batch, ce.normalizers(student, [batch])).metrics["mtp_loss"]
    torch.testing.assert_close(out.metrics["mtp_loss"], ref)
    assert "mtp_loss" not in ForwardKLLoss(teacher)(student, batch, norms).metrics  # mtp_lambda 0: no MTP term
