"""Scale-out on torch.distributed, applied from beside the single-device model (torchtitan's layout).

    from r1forge.parallel import ParallelConfig, init_parallel, parallelize
    mesh = init_parallel(ParallelConfig(dp_shard=-1, ep=2))  # under torchrun; NCCL on CUDA, gloo on CPU
    model = parallelize(model, mesh)                         # FSDP2 over all ranks, routed experts split over ep

- config.py: `ParallelConfig`, the run config's `parallel:` section, and the checks of its degrees;
- mesh.py: `init_parallel` -> `ParallelMesh` (the [dp_shard, ep] DeviceMesh, its groups, small collectives);
- expert_parallel.py: `LocalExperts` and the all-to-all `AllToAllDispatch` behind the model's dispatch seam;
- parallelize.py: EP + FSDP2 (`fully_shard` per block and at the root, bf16/fp32 mixed precision on CUDA);
- grad.py: the global gradient norm and clipping over sharded gradients;
- checkpoint.py: sharded DCP checkpoints (atomic, exact resume, resharding) and their export to HF safetensors;
- tensor_parallel.py: inference tensor parallelism (heads, MLP widths; experts by width or by rank through the
  all-to-all dispatcher) applied to a built or meta model, and the `ShardLayout` each rank loads with;
- sharded_load.py: one rank's shard read straight from the safetensors files (`get_slice`, FP8 included);
- gather.py: an unsharded copy of a sharded model's weights on every rank;
- rl.py: data-parallel GRPO (replicated policy, each rank its share of the prompts, reduced gradients) and the
  sharded evaluation / teacher-trace sampling distillation uses.
The engine's multi-process executor over these is r1forge/engine/executor.py.
"""

from r1forge.parallel.config import ParallelConfig
from r1forge.parallel.expert_parallel import AllToAllDispatch, LocalExperts, shard_experts
from r1forge.parallel.grad import clip_grad_norm_
from r1forge.parallel.mesh import ParallelMesh, init_parallel
from r1forge.parallel.parallelize import parallelize

__all__ = ["ParallelConfig", "ParallelMesh", "init_parallel", "parallelize", "AllToAllDispatch", "LocalExperts",
           "shard_experts", "clip_grad_norm_"]
