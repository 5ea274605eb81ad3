"""Tensor-parallel inference (tensor_parallel_size=2, gloo on CPU): equal to the single-device engine, 1/N memory,
per-rank sharded loading (FP8 included), and faults that end the engine instead of hanging it.

One spawned TP engine per class (starting workers is the slow part) serves several assertions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_checkpoint, randomise_
from r1forge import LLM
from r1forge.config import ModelConfig
from r1forge.checkpoint.fp8 import quantize_fp8_blockwise
from r1forge.engine.config import EngineConfig
from r1forge.engine.rank_shard import WorkerError
from r1forge.engine.sampling_params import SamplingParams
from r1forge.loading import load_model
from r1forge.parallel.sharded_load import load_model_shard
from r1forge.parallel.tensor_parallel import resident_bytes

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [3, 4]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, logprobs=0)
# 16-token blocks and a pool of 10: three ~70-token sequences need 15, so the scheduler preempts and recomputes.
TIGHT = dict(block_size=16, num_blocks=10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    # a dense layer and a MoE layer: every kind of sharded block, the fewest collectives per step
    return str(make_hf_checkpoint(tmp_path_factory.mktemp("tp") / "ckpt", num_hidden_layers=2))


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The single-device engine (default pool: no preemption) and its greedy outputs."""
    llm = LLM(checkpoint, block_size=16)
    return llm, llm.generate(PROMPTS, GREEDY)


@pytest.fixture(scope="class")
def llm(request, checkpoint):
    """One TP engine per test class (rank 0 can be in one process group at a time): the class's `ENGINE`."""
    llm = LLM(checkpoint, tensor_parallel_size=2, **request.cls.ENGINE)
    yield llm
    llm.shutdown()


def assert_same(outputs, expected) -> None:
    for got, want in zip(outputs, expected, strict=True):
        for g, w in zip(got.outputs, want.outputs, strict=True):
            assert g.token_ids == w.token_ids
            if w.logprobs is not None:
                assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs)) < 1e-5


def check_memory(llm: LLM, checkpoint: str, expert_parallel: bool) -> None:
    """Per rank: the head projections and the routed experts are 1/2 of the model's; the latent is replicated."""
    full = resident_bytes(load_model(checkpoint))
    ranks = llm.engine.runner.executor.rank_bytes
    assert sorted(ranks) == [0, 1]
    for rank, held in ranks.items():
        assert abs(held["attention_heads"] / full["attention_heads"] - 0.5) < 0.01, rank
        assert abs(held["routed_experts"] / full["routed_experts"] - 0.5) < 0.01, rank
        assert held["attention_latent"] == full["attention_latent"], rank
    attention = sum(h["attention_heads"] + h["attention_latent"] for h in ranks.values())
    print(f"ep={expert_parallel}: per-rank attention {ranks[0]['attention_heads'] + ranks[0]['attention_latent']} "
          f"of {full['attention_heads'] + full['attention_latent']} bytes, routed experts "
          f"{ranks[0]['routed_experts']} of {full['routed_experts']}; both ranks' attention {attention}")


@pytest.mark.distributed
@pytest.mark.timeout(600)
class TestTensorParallel:
    ENGINE = TIGHT
    def test_greedy_equals_single_device_with_preemption(self, llm, reference):
        assert_same(llm.generate(PROMPTS, GREEDY), reference[1])
        assert llm.stats()["preemptions"] > 0

    def test_prefix_caching_n_and_streaming(self, llm, reference):
        ref_llm = reference[0]
        shared = list(range(50, 90))  # 2 full blocks of 16 shared by both prompts
        prompts = [shared + [3], shared + [4, 5]]
        short = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
        before = llm.stats()["prefix_hit_tokens"]
        for prompt in prompts:  # one after the other: the second reads the first one's cached blocks
            assert_same(llm.generate([prompt], short), ref_llm.generate([prompt], short))
        assert llm.stats()["prefix_hit_tokens"] - before >= 32
        sampled = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=8, ignore_eos=True, logprobs=0)
        assert_same(llm.generate([PROMPTS[1]], sampled), ref_llm.generate([PROMPTS[1]], sampled))
        streamed = [t for d in llm.stream(PROMPTS[0], short) for t in d.token_ids]
        assert streamed == ref_llm.generate([PROMPTS[0]], short)[0].outputs[0].token_ids

    def test_memory_per_rank(self, llm, checkpoint):
        check_memory(llm, checkpoint, expert_parallel=False)

    def test_update_weights_hands_the_policy_to_every_rank(self, llm, checkpoint):
        """What GRPO rollouts over a TP engine need after each optimizer step: the trainer's new weights."""
        policy = randomise_(load_model(checkpoint), seed=5)
        seconds = llm.update_weights(policy)
        short = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
        assert_same(llm.generate(PROMPTS, short), LLM(policy, block_size=16).generate(PROMPTS, short))
        print(f"weight hand-over to 2 ranks: {seconds * 1e3:.1f} ms for "
              f"{sum(t.numel() * t.element_size() for t in policy.state_dict().values())} bytes")

    def test_worker_that_raises_stops_the_engine(self, llm):
        executor = llm.engine.runner.executor
        executor.inject_worker_error(1, "injected failure")
        with pytest.raises(WorkerError, match="worker rank 1 raised(.|\n)*injected failure"):
            llm.generate(PROMPTS[:1], GREEDY)
        with pytest.raises(WorkerError):  # stopped: every later step raises the same error
            llm.generate(PROMPTS[:1], GREEDY)
        assert all(not proc.is_alive() for proc, _ in executor.workers)


@pytest.mark.distributed
@pytest.mark.timeout(600)
class TestExpertParallel:
    ENGINE = dict(enable_expert_parallel=True, block_size=16)
    def test_greedy_equals_single_device(self, llm, reference):
        assert_same(llm.generate(PROMPTS, GREEDY), reference[1])
        # one sequence: a decode step has one token, so one rank's slice of the all-to-all is empty
        assert_same(llm.generate(PROMPTS[:1], GREEDY), reference[1][:1])

    def test_memory_per_rank(self, llm, checkpoint):
        check_memory(llm, checkpoint, expert_parallel=True)

    def test_killed_worker_fails_the_step_and_health(self, llm):
        executor = llm.engine.runner.executor
        proc = executor.workers[0][0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        deadline = time.monotonic() + 10  # the watchdog polls every half second
        while executor.failure is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(WorkerError, match="worker rank 1 .*died with exit code -9"):
            llm.engine.check_health()
        with pytest.raises(WorkerError, match="died"):
            llm.generate(PROMPTS[:1], GREEDY)


def test_engine_config_checks_the_split(checkpoint):
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="single-device only"):
        EngineConfig(tensor_parallel_size=2, static_decode=True)
    with pytest.raises(ValueError, match=r"does not divide the model's num_attention_heads \(4\)"):
        LLM(checkpoint, tensor_parallel_size=3)  # checked before any worker starts
    sixteen_heads = dataclasses.replace(ModelConfig.from_pretrained(checkpoint), num_attention_heads=16)
    with pytest.raises(ValueError, match=r"n_routed_experts \(8\)"):
        EngineConfig(tensor_parallel_size=16, enable_expert_parallel=True).check_model(sixteen_heads)


def test_each_rank_reads_only_its_slices_fp8_included(tmp_path):
    """Rank shards loaded from an FP8 checkpoint (blocks of 24, so slices cut blocks) equal the slices of the
    fully loaded model, and with expert parallelism a rank never reads the other rank's experts."""
    directory = make_hf_checkpoint(tmp_path / "fp8")
    file = directory / "model.safetensors"
    tensors = load_file(file)
    fp8_keys = ["model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.self_attn.o_proj.weight",
                "model.layers.2.mlp.experts.3.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"]
    for key in fp8_keys:
        tensors[key], tensors[key.replace(".weight", ".weight_scale_inv")] = quantize_fp8_blockwise(tensors[key], 24)
    save_file(tensors, file)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [24, 24]}
    (directory / "config.json").write_text(json.dumps(config))
    full = load_model(directory).state_dict()
    for expert_parallel in (False, True):
        for rank in (0, 1):
            shard, layout = load_model_shard(directory, rank, 2, expert_parallel=expert_parallel,
                                             keep_lm_head=rank == 0)
            state = shard.state_dict()
            for name, value in state.items():
                spec = layout.shard_of(name)
                expected = full[name] if spec is None else spec.take(full[name])
                assert torch.equal(value, expected), name
            assert set(layout.shards) >= {"model.layers.1.self_attn.kv_b_proj.weight",
                                          "model.layers.1.self_attn.o_proj.weight"}
            experts = {n.split(".experts.")[1].split(".")[0] for n in state if ".mlp.experts." in n}
            assert experts == ({"0", "1", "2", "3"} if rank == 0 else {"4", "5", "6", "7"}) if expert_parallel \
                else experts == {str(e) for e in range(8)}
            assert ("lm_head.weight" in state) == (rank == 0)


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_under_torchrun_rank0_generates_what_one_device_does(checkpoint, reference, tmp_path):
    out = tmp_path / "tokens.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    script = Path(__file__).parent / "distributed" / "tp_engine.py"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    str(script), checkpoint, str(out), json.dumps(PROMPTS)], env=env, check=True, timeout=540)
    short = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
    for (tokens, logprobs), want in zip(json.loads(out.read_text()), reference[0].generate(PROMPTS, short),
                                        strict=True):
        assert tokens == want.outputs[0].token_ids
        assert max(abs(a - b) for a, b in zip(logprobs, want.outputs[0].logprobs)) < 1e-5
