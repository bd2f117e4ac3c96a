"""RolloutEngine.sync_weights is collective: 2 gloo ranks, rank 0 holds the registered hf engine, rank 1 holds None.

    torchrun --nproc-per-node 2 tests/distributed/engine_sync_checks.py --out results.json

The weights stand in for the trainer's export (`PolicyWeights`): each tensor costs one collective on the host
group, as the export's tensor/expert/pipeline gathers do, and only rank 0 receives full tensors. Cases:
- "ok": every rank walks every tensor; rank 0's engine ends with exactly the given weights (its greedy logprobs equal,
  bitwise in fp32, those of an engine built with the same weights) after one update (weight_version 1).
- "planted": a name the engine does not know, after the first tensor: rank 0's engine refuses it; every rank still
  walks every tensor (no rank is left in a collective) and both raise the same WeightSyncError.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist

from megatron_r3.model.hf_module import hf_state_dict_to_checkpoint_names
from megatron_r3.platform.distributed import host_group
from megatron_r3.platform.parallel_context import ParallelContext, ParallelSizes
from megatron_r3.rollout.base import EngineSetup, SamplingParams, WeightSyncError
from megatron_r3.rollout.config import RolloutConfig
from megatron_r3.rollout.engines import engine_class
from tests.distributed.launch import finish_launch


class WalkedWeights:
    """A PolicyWeights stand-in: one host-group collective per tensor; full tensors on rank 0, None elsewhere."""

    def __init__(self, named: list, parallel: ParallelContext):
        self.named = named
        self.parallel = parallel  # sync_weights agrees on failures over its host group
        self.walked = 0

    def named_tensors(self):
        for name, tensor in self.named:
            token = torch.ones(1)
            dist.all_reduce(token, group=host_group())  # the gather every rank takes part in
            self.walked += 1
            yield name, tensor if dist.get_rank() == 0 else None


def tiny_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        mlp_only_layers=[0], max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.2,
    )


def greedy(engine) -> list:
    sample = engine.generate([[3, 9, 27]], SamplingParams(temperature=0.0, max_new_tokens=4)).samples[0]
    return sample.response_logprobs.tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from transformers import Qwen3MoeForCausalLM

    config = tiny_config()
    torch.manual_seed(7)  # the same "policy" on every rank
    policy = Qwen3MoeForCausalLM(config)
    named = [(name, tensor.detach().clone()) for name, tensor in hf_state_dict_to_checkpoint_names(policy)]
    cls = engine_class("hf")
    setup = EngineSetup(config=None, rollout=RolloutConfig(rollout_dtype="fp32"), hf_config=config, progress=False)
    torch.manual_seed(0)  # the engine starts from other weights than the policy's
    engine = cls.build(setup) if rank == 0 else None
    records = []
    parallel = ParallelContext(ParallelSizes(), dist.get_world_size(), rank, host_group=host_group())

    weights = WalkedWeights(named, parallel)
    cls.sync_weights(engine, weights, setup)
    record = {"case": "ok", "rank": rank, "walked": weights.walked, "expected": len(named)}
    if rank == 0:
        reference = cls(copy.deepcopy(policy), state_dict=dict(named), dtype="fp32", progress=False)
        record.update(version=engine.weight_version, synced=greedy(engine), reference=greedy(reference))
    records.append(record)

    planted = WalkedWeights(named[:1] + [("model.layers.0.bogus.weight", torch.zeros(2))] + named[1:], parallel)
    error = None
    try:
        cls.sync_weights(engine, planted, setup)
    except WeightSyncError as exc:
        error = str(exc)
    records.append({"case": "planted", "rank": rank, "walked": planted.walked, "expected": len(planted.named),
                    "error": error})

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    finish_launch([record for ranks in gathered for record in ranks], out)


if __name__ == "__main__":
    main()
