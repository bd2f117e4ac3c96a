"""The one bucketer (platform/buckets.py), the one dtype table (platform/dtypes.py) and the one safetensors writer
(model/safetensors_writer.py): bucket boundaries, dtype spellings, and a written directory that transformers reloads
bit for bit (single file and sharded)."""

import json
import os

import pytest
import torch

from megatron_r3.model.hf_module import hf_state_dict_to_checkpoint_names
from megatron_r3.model.safetensors_writer import SAFE_INDEX, SAFE_SINGLE, write_hf_directory
from megatron_r3.platform.buckets import iter_buckets
from megatron_r3.platform.dtypes import SHORT_NAMES, dtype_name, torch_dtype

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402


# ---------------------------------------------------------------------------------------------------- bucketer
def test_iter_buckets_cuts_by_bytes_given_by_name():
    """Sizes by name (tensors None, as on export ranks other than 0): a too-large item goes alone."""
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1, "e": 1}
    buckets = list(iter_buckets([(n, None) for n in sizes], 8, lambda name, _tensor: sizes[name]))
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d", "e"]]


def test_iter_buckets_defaults_to_tensor_bytes():
    items = [("f32x2", torch.zeros(2)), ("bf16x4", torch.zeros(4, dtype=torch.bfloat16)), ("f32x1", torch.zeros(1))]
    assert [[n for n, _ in b] for b in iter_buckets(items, 8)] == [["f32x2"], ["bf16x4"], ["f32x1"]]
    assert [[n for n, _ in b] for b in iter_buckets(items, 16)] == [["f32x2", "bf16x4"], ["f32x1"]]
    assert list(iter_buckets([], 8)) == []
    with pytest.raises(ValueError, match="bucket_bytes must be positive, got 0"):
        list(iter_buckets(items, 0))


# ---------------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("spelling,expected", [
    ("bf16", torch.bfloat16), ("BF16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
    ("fp16", torch.float16), ("float16", torch.float16), ("fp32", torch.float32), ("float32", torch.float32),
    ("torch.int64", torch.int64), (torch.float16, torch.float16),
])
def test_torch_dtype_spellings(spelling, expected):
    assert torch_dtype(spelling) is expected


def test_dtype_names_and_refusals():
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name("fp32") == "float32"
    assert all(getattr(torch, dtype_name(short)) is torch_dtype(short) for short in SHORT_NAMES)
    for bad in ("bf17", "Tensor", 3):  # "Tensor" is a torch attribute, not a dtype
        with pytest.raises(ValueError, match=rf"^unknown dtype {bad!r}: use a torch dtype, a torch dtype name "
                                             r"\(bfloat16\) or one of bf16, fp16, fp32$"):
            torch_dtype(bad)


# ---------------------------------------------------------------------------------------------------- writer
def _tiny():
    config = Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_intermediate_size=16,
                            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0], max_position_embeddings=32)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape))
    return config, model, dict(hf_state_dict_to_checkpoint_names(model))


def _reloaded_equal(directory, model) -> bool:
    reloaded = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    original = model.state_dict()
    return sorted(reloaded.state_dict()) == sorted(original) and all(
        torch.equal(tensor, original[name]) for name, tensor in reloaded.state_dict().items())


def test_sharded_write_reloads_bit_identically_and_indexes_every_byte(tmp_path):
    config, model, tensors = _tiny()
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    written = write_hf_directory(tensors.items(), str(tmp_path), hf_config=config, max_shard_bytes=largest)
    shards = [name for name in written if name.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert written == shards + [SAFE_INDEX, "config.json"]
    assert sorted(os.listdir(tmp_path)) == sorted(written)  # no temporary shard left behind
    with open(tmp_path / SAFE_INDEX) as handle:
        index = json.load(handle)
    assert sorted(index["weight_map"]) == sorted(tensors) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert _reloaded_equal(tmp_path, model)


def test_single_file_write_replaces_a_stale_index_and_records_the_dtype(tmp_path):
    config, model, tensors = _tiny()
    write_hf_directory(tensors.items(), str(tmp_path), hf_config=config, max_shard_bytes=1024)
    assert (tmp_path / SAFE_INDEX).exists()
    bf16 = {name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}
    written = write_hf_directory(bf16.items(), str(tmp_path), hf_config=config, dtype=torch.bfloat16)
    assert written == [SAFE_SINGLE, "config.json"] and not (tmp_path / SAFE_INDEX).exists()
    with open(tmp_path / "config.json") as handle:
        assert json.load(handle)["dtype"] == "bfloat16"
    assert _reloaded_equal(tmp_path, model.to(torch.bfloat16))
