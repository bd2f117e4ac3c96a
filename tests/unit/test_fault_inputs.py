"""Bad inputs of issue 14 answered in-process with one clear error (or a finite/infinite metric, never a crash):
engine logprobs (-inf, +inf, NaN, positive), absurd finite logprobs in the mismatch metrics, routes sent as an
integer, non-UTF-8 prompt files, too-long prompts, TE-only and TP-without-SP layouts, and the preflight checks that
run before the heavy imports."""

from __future__ import annotations

import math
import types

import pytest
import torch

from megatron_r3.grpo.mismatch import MetricAccumulator
from megatron_r3.replay.config_checks import LayoutConfigError, check_layout
from megatron_r3.replay.routes import RouteError
from megatron_r3.rollout.engines.sglang.codec import decode_sglang_routed_experts
from megatron_r3.rollout.engines.sglang.protocol import ProtocolError, output_tokens_and_logprobs
from megatron_r3.train.data import DataError, PromptRecord, check_prompt_lengths, load_prompts
from megatron_r3.train.preflight import UsageError, preflight
from megatron_r3.train.rollout_phase import logprob_problem


@pytest.mark.parametrize("value", [float("-inf"), float("inf"), float("nan"), 0.5])
def test_sglang_logprob_must_be_finite_and_not_positive(value):
    meta = {"output_token_logprobs": [[-0.5, 5, "a"], [value, 6, "b"]]}
    with pytest.raises(ProtocolError) as error:
        output_tokens_and_logprobs(meta)
    assert str(error.value) == (f"output_token_logprobs[1] has logprob {value} (a sampled token's log-probability "
                                f"must be finite and <= 0)")


def test_any_engine_logprobs_are_checked():
    assert logprob_problem(torch.tensor([-0.1, 0.0, -1e30])) == ""  # finite and <= 0: fine
    assert logprob_problem(torch.tensor([-0.1, float("-inf"), 2.0])) == (
        "hold 2 value(s) that are not finite log-probabilities <= 0, the first at response token 1: -inf")


def test_mismatch_metrics_of_an_absurd_finite_logprob_do_not_overflow():
    acc = MetricAccumulator()  # main raised OverflowError: math range error (math.exp of mean |delta| = 1e30)
    acc.add_mismatch(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1e30, -2.0]]), torch.ones(1, 2))
    means = acc.means()
    assert means["token_mult_prob_error"] == math.inf
    assert means["rollout_train_logp_abs_diff"] == pytest.approx(5e29, rel=1e-6)
    assert means["rollout_train_extreme_frac_tau2"] == 0.5


def test_routes_sent_as_an_integer_are_a_route_error():
    with pytest.raises(RouteError) as error:
        decode_sglang_routed_experts(12345, num_layers=2, topk=2, num_experts=4, sample_id=3, rank=0)
    assert "routed_experts must be a base64 string, got int '12345'" in str(error.value)


def test_non_utf8_prompt_file_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "b\xff", "answer": "2"}\n')
    with pytest.raises(DataError) as error:
        load_prompts(path)
    assert str(error.value) == f"{path}:2: not UTF-8 text (byte 0xff at column 14); re-encode the file as UTF-8"
    json_path = tmp_path / "p.json"
    json_path.write_bytes(b'[{"prompt": "a", "answer": "1"},\n {"prompt": "\xfe", "answer": "2"}]')
    with pytest.raises(DataError, match=r"p.json:2: not UTF-8 text \(byte 0xfe at column 14\)"):
        load_prompts(json_path)


class _CharTokenizer:
    bos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_every_too_long_prompt_is_reported_at_start_or_skipped_with_a_count():
    records = [PromptRecord(prompt=p, answer="", index=i, metadata={}) for i, p in enumerate(["ab", "abcdef", "a",
                                                                                              "abcde"])]
    with pytest.raises(DataError) as error:
        check_prompt_lengths(_CharTokenizer(), records, max_length=4)
    assert str(error.value) == ("2 of 4 prompts are longer than --seq-length - --max-new-tokens = 4 tokens: prompts "
                                "1 (6 tokens), 3 (5 tokens); raise --seq-length, shorten them, or pass "
                                "--skip-long-prompts to drop them")
    kept, dropped = check_prompt_lengths(_CharTokenizer(), records, max_length=4, skip=True)
    assert [r.index for r in kept] == [0, 2] and dropped == [(1, 6), (3, 5)]


def test_layouts_that_cannot_run_are_refused_at_parse_time():
    base = dict(transformer_impl="local", moe_router_fusion=False, tensor_model_parallel_size=1, num_experts=8,
                sequence_parallel=False)
    check_layout(types.SimpleNamespace(**base), transformer_engine=False)
    cases = [
        (dict(moe_router_fusion=True), "--moe-router-fusion needs TransformerEngine, which is not installed; drop "
                                       "the flag"),
        (dict(transformer_impl="inference_optimized"), "--transformer-impl inference_optimized needs "
                                                       "TransformerEngine, which is not installed; use "
                                                       "--transformer-impl local"),
        (dict(tensor_model_parallel_size=2), "--tensor-model-parallel-size 2 with MoE layers needs "
                                             "--sequence-parallel (megatron-core's MoE layer refuses tensor "
                                             "parallelism without it)"),
    ]
    for change, message in cases:
        with pytest.raises(LayoutConfigError) as error:
            check_layout(types.SimpleNamespace(**{**base, **change}), transformer_engine=False)
        assert str(error.value) == message
    check_layout(types.SimpleNamespace(**{**base, "tensor_model_parallel_size": 2, "sequence_parallel": True}),
                 transformer_engine=False)


@pytest.mark.parametrize("argv, environ, message", [
    (["--config", "nope.yaml"], {}, "--config nope.yaml: no such file"),
    (["--hf-config", "configs/models/qwen3_moe_tiny.json", "--tensor-model-parallel-size", "2"], {},
     "tensor x pipeline x context parallel = 2 x 1 x 1 needs 2 processes (or a multiple): use torchrun "
     "--nproc-per-node 2 pretrain_grpo.py ..."),
    (["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"], {"RANK": "0", "WORLD_SIZE": "2"},
     "tensor x pipeline x context parallel = 1 x 2 x 1, expert tensor x expert x pipeline parallel = 1 x 2 x 2 "
     "needs a multiple of 4 processes, but torchrun started 2"),
])
def test_preflight_messages(argv, environ, message):
    with pytest.raises(UsageError) as error:
        preflight(argv, environ=environ)
    assert str(error.value) == message


def test_preflight_yaml_typo_and_empty_checkpoint(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("hf_config: configs/models/qwen3_moe_tiny.json\nrollout_engin: hf\n")
    with pytest.raises(UsageError, match=r"unknown config keys 'rollout_engin' \(did you mean 'rollout_engine'\?\)"):
        preflight(["--config", str(config)], environ={})
    empty = tmp_path / "ckpt"
    empty.mkdir()
    with pytest.raises(UsageError) as error:
        preflight(["--hf-checkpoint", str(empty)], environ={})
    assert str(error.value) == (f"--hf-checkpoint {empty}: no config.json there (a Hugging Face checkpoint "
                                f"directory holds config.json, the tokenizer and *.safetensors)")
    preflight(["--config", "configs/demo_tiny.yaml"], environ={})  # a good config passes
