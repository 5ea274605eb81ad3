"""Worker (run by tests/test_tensor_parallel.py under torchrun): every rank calls LLM(..., tensor_parallel_size=2);
rank 0 generates greedily and writes the token ids and logprobs to OUT; the other rank serves it inside LLM()."""

from __future__ import annotations

import json
import sys

from r1forge import LLM, SamplingParams


def main(checkpoint: str, out: str, prompts: str) -> None:
    llm = LLM(checkpoint, tensor_parallel_size=2, enable_expert_parallel=True, block_size=16)
    outputs = llm.generate(json.loads(prompts), SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                               logprobs=0))
    llm.shutdown()
    with open(out, "w") as f:
        json.dump([[o.outputs[0].token_ids, o.outputs[0].logprobs] for o in outputs], f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
