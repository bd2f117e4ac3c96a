"""SGLang wire format (megatron_r3.rollout.engines.sglang.protocol): request bodies, reply parsing, route checks, weight-sync
payloads, address files, and the trainer's handling of failed prompts (rollout_phase.select_groups)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_r3.replay.routes import RouteError
from megatron_r3.rollout.engines.sglang.codec import encode_sglang_routed_experts
from megatron_r3.rollout.base import RolloutFailure, RolloutResult, RolloutSample, SamplingParams
from megatron_r3.rollout.engines.sglang.protocol import (
    AbortedError,
    MissingRoutesError,
    ProtocolError,
    check_success,
    generate_payload,
    init_weights_update_group_payload,
    normalize_url,
    parse_address_lines,
    parse_sample,
    plan_samples,
    read_address_file,
    reply_entries,
    sampling_params_payload,
    server_facts,
    split_requests,
    update_weights_from_disk_payload,
    update_weights_from_distributed_payload,
    weight_version_of,
)

LAYERS, TOPK, EXPERTS = 4, 2, 8


def routes_array(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.permutation(EXPERTS)[:TOPK] for _ in range(LAYERS)]) for _ in range(rows)])
    ids[:, 0] = 0  # dense layer 0, zero-filled like SGLang
    return ids.astype(np.int64)


def reply(prompt_len: int, response=(5, 6, 7), *, routes_rows=None, dtype=None, start_len=None, finish="length",
          with_routes=True):
    meta = {"finish_reason": {"type": finish, "length": len(response)} if finish != "stop"
            else {"type": "stop", "matched": response[-1]},
            "output_token_logprobs": [[-0.5 - i, t, None] for i, t in enumerate(response)],
            "prompt_tokens": prompt_len, "completion_tokens": len(response)}
    if with_routes:
        rows = prompt_len + len(response) - 1 - (start_len or 0) if routes_rows is None else routes_rows
        meta["routed_experts"] = encode_sglang_routed_experts(routes_array(rows), dtype=dtype or "int32")
        if dtype:
            meta["routed_experts_dtype"] = dtype
        if start_len:
            meta["routed_experts_start_len"] = start_len
    return {"text": "", "output_ids": list(response), "meta_info": meta}


def parse(entry, prompt=(1, 2, 3, 4), **kwargs):
    defaults = dict(prompt_ids=list(prompt), prompt_index=3, return_routes=True, num_layers=LAYERS, topk=TOPK,
                    num_experts=EXPERTS, vocab_size=64, sample_id="s")
    defaults.update(kwargs)
    return parse_sample(entry, **defaults)


# ------------------------------------------------------------------------------------------------ requests
def test_sampling_params_use_sglang_names_and_a_seed_per_sample():
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=5, stop_token_ids=(2, 9), seed=10)
    specs = plan_samples(2, 3, sp.seed)
    assert [(s.prompt_index, s.group_index, s.flat_index) for s in specs] == [
        (0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 0, 3), (1, 1, 4), (1, 2, 5)]
    assert [s.seed for s in specs] == [10, 11, 12, 13, 14, 15]  # distinct: SGLang's seeded sampler repeats a seed
    assert sampling_params_payload(sp, specs[4].seed) == {
        "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_new_tokens": 5, "stop_token_ids": [2, 9],
        "sampling_seed": 14}
    unseeded = sampling_params_payload(SamplingParams(top_k=4), None)
    assert "sampling_seed" not in unseeded and "stop_token_ids" not in unseeded and unseeded["top_k"] == 4
    assert all(s.seed is None for s in plan_samples(1, 2, None))


def test_generate_payload_single_and_batch_forms():
    sp = [{"max_new_tokens": 1}, {"max_new_tokens": 2}]
    single = generate_payload([[1, 2]], sp[:1], return_routes=True, batch=False)
    assert single == {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}, "return_logprob": True,
                      "logprob_start_len": -1, "return_routed_experts": True}
    batch = generate_payload([[1, 2], [3]], sp, return_routes=False, batch=True)
    assert batch["input_ids"] == [[1, 2], [3]] and batch["sampling_params"] == sp
    assert "return_routed_experts" not in batch  # not sent at all when routes are not wanted
    with pytest.raises(ValueError):
        generate_payload([[1], [2]], sp, return_routes=False, batch=False)


def test_split_requests():
    specs = plan_samples(3, 2, 0)
    assert [len(r) for r in split_requests(specs, 1)] == [1] * 6
    assert [len(r) for r in split_requests(specs, 4)] == [4, 2]
    assert [len(r) for r in split_requests(specs, 0)] == [6]
    assert [r[0].flat_index for r in split_requests(specs, 4)] == [0, 4]


# ------------------------------------------------------------------------------------------------ replies
def test_parse_sample_reads_tokens_logprobs_routes():
    sample = parse(reply(4, finish="stop"))
    assert isinstance(sample, RolloutSample)
    assert sample.tokens.tolist() == [1, 2, 3, 4, 5, 6, 7] and sample.prompt_length == 4
    assert sample.response_logprobs.tolist() == [-0.5, -1.5, -2.5] and sample.finish_reason == "stop"
    assert sample.prompt_index == 3 and sample.routes.source == "sglang"
    assert sample.routes.num_rows == 6 and sample.routes.end_row == 6  # T - 1 rows
    assert torch.equal(sample.routes.expert_ids.long(), torch.from_numpy(routes_array(6)))


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32"])
def test_routed_experts_dtype_is_honoured(dtype):
    sample = parse(reply(4, dtype=dtype))
    assert torch.equal(sample.routes.expert_ids.long(), torch.from_numpy(routes_array(6)))


def test_start_len_shifts_the_rows():
    sample = parse(reply(4, start_len=2))
    assert sample.routes.start_row == 2 and sample.routes.num_rows == 4 and sample.routes.end_row == 6
    with pytest.raises(RouteError, match="start_len"):  # rows counted without the start offset
        parse(reply(4, routes_rows=6, start_len=2))


def test_wrong_row_count_and_truncated_base64_are_route_errors():
    with pytest.raises(RouteError, match=r"routed_experts has 5 rows, expected .* = 6"):
        parse(reply(4, routes_rows=5))
    entry = reply(4)
    entry["meta_info"]["routed_experts"] = entry["meta_info"]["routed_experts"][:-3]
    with pytest.raises(RouteError, match="not valid base64|truncated"):
        parse(entry)
    entry = reply(4)
    payload = entry["meta_info"]["routed_experts"]
    entry["meta_info"]["routed_experts"] = payload[: (len(payload) // 2) // 4 * 4]  # valid base64, partial rows
    with pytest.raises(RouteError):
        parse(entry)


def test_missing_routes_names_the_server_flag():
    with pytest.raises(MissingRoutesError, match="--enable-return-routed-experts"):
        parse(reply(4, with_routes=False))
    assert parse(reply(4, with_routes=False), return_routes=False).routes is None


def test_protocol_errors():
    with pytest.raises(AbortedError):
        parse(reply(4, finish="abort"))
    entry = reply(4)
    del entry["meta_info"]["output_token_logprobs"]
    with pytest.raises(ProtocolError, match="output_token_logprobs"):
        parse(entry)
    entry = reply(4, response=(5, 99))
    with pytest.raises(ProtocolError, match="outside the vocabulary"):
        parse(entry)
    entry = reply(4)
    entry["meta_info"]["output_token_logprobs"][1][0] = None
    with pytest.raises(ProtocolError, match="logprob"):
        parse(entry)
    with pytest.raises(ProtocolError, match="2 results for 1"):
        reply_entries([reply(4), reply(4)], 1)
    with pytest.raises(ProtocolError, match="meta_info"):
        reply_entries({"text": "x"}, 1)
    assert len(reply_entries(reply(4), 1)) == 1


# ------------------------------------------------------------------------------------------------ weight sync
def test_weight_sync_payloads():
    assert init_weights_update_group_payload(master_address="10.0.0.1", master_port=29600, rank_offset=1,
                                             world_size=9, group_name="g", backend="nccl") == {
        "master_address": "10.0.0.1", "master_port": 29600, "rank_offset": 1, "world_size": 9, "group_name": "g",
        "backend": "nccl"}
    tensors = [torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(4)]
    payload = update_weights_from_distributed_payload(["a.weight", "b.weight"], tensors, group_name="g",
                                                      flush_cache=False, weight_version="3")
    assert payload == {"names": ["a.weight", "b.weight"], "dtypes": ["bfloat16", "float32"],
                       "shapes": [[2, 3], [4]], "group_name": "g", "flush_cache": False, "weight_version": "3"}
    assert update_weights_from_disk_payload("/w/v3", weight_version="3") == {
        "model_path": "/w/v3", "load_format": None, "weight_version": "3"}
    assert check_success({"success": True, "message": "ok"}, "x") == "ok"
    with pytest.raises(ProtocolError, match="x failed: nope"):
        check_success({"success": False, "message": "nope"}, "x")
    assert weight_version_of({"weight_version": "7"}) == "7" and weight_version_of({}) is None
    facts = server_facts({"tp_size": 4, "dp_size": 1, "enable_return_routed_experts": False, "version": "0.5.7"})
    assert facts.weight_sync_ranks == 4 and facts.routes_enabled is False and facts.version == "0.5.7"
    assert server_facts("not a dict").routes_enabled is None
    # SGLang 0.5.23 numbers weight-update ranks rank_offset + tp_rank: no pipeline term (pp > 1 is refused)
    staged = server_facts({"tp_size": 2, "pp_size": 2, "enable_deterministic_inference": True})
    assert staged.weight_sync_ranks == 2 and staged.pp_size == 2 and staged.deterministic is True
    assert server_facts({"tp_size": 2}).deterministic is None


def test_address_files(tmp_path):
    assert normalize_url("node1:30000") == "http://node1:30000"
    assert normalize_url(" http://a:1/ ") == "http://a:1"
    assert parse_address_lines("# servers\nnode1:30000\n\nhttp://node2:30001  # second\n") == [
        "http://node1:30000", "http://node2:30001"]
    single = tmp_path / "addresses.txt"
    single.write_text("a:1\nb:2\n")
    assert read_address_file(str(single)) == ["http://a:1", "http://b:2"]
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "node2.txt").write_text("n2:1\n")
    (folder / "node1.txt").write_text("n1:1\nn1:2\n")
    (folder / ".node3.txt.tmp-1").write_text("partial:1\n")
    assert read_address_file(str(folder)) == ["http://n1:1", "http://n1:2", "http://n2:1"]


# ------------------------------------------------------------------------------------------------ failed prompts
def _result(num_prompts, group, failed=(), drop=()):
    samples, failures = [], []
    for p in range(num_prompts):
        if p in failed:
            failures.append(RolloutFailure(p, "boom"))
        elif p not in drop:
            samples += [RolloutSample(torch.tensor([1, 2]), 1, torch.zeros(1), None, "length", p)] * group
    return RolloutResult(samples, failures)


def _settings(policy, gbs, group=4):
    from megatron_r3.train.rollout_phase import RolloutSettings

    return RolloutSettings(sampling=SamplingParams(), group_size=group, return_routes=False, moe_layers=(),
                           topk=2, route_fallback="raise", failure_policy=policy, global_batch_size=gbs)


def test_failed_prompts_raise_by_default_and_are_skipped_with_trimming():
    from megatron_r3.train.rollout_phase import select_groups

    kept, failed, trimmed, error = select_groups(_result(8, 4, failed={2}), 8, _settings("raise", 16))
    assert error and "prompt 2: boom" in error and "--rollout-failure-policy skip" in error
    # skip: 7 groups of 4 = 28 samples; mini-batches of 16 need whole multiples -> 4 groups kept, 3 trimmed
    kept, failed, trimmed, error = select_groups(_result(8, 4, failed={2}), 8, _settings("skip", 16))
    assert error is None and failed == ["prompt 2: boom"] and trimmed == [5, 6, 7]
    assert [s.prompt_index for s in kept] == [0] * 4 + [1] * 4 + [3] * 4 + [4] * 4
    # global batch not a multiple of the group: 4-sample groups, mini-batches of 6 -> groups in threes
    kept, _, trimmed, error = select_groups(_result(8, 4, failed={0, 1, 2}), 8, _settings("skip", 6))
    assert error is None and len(kept) == 12 and trimmed == [6, 7]
    # nothing left for one mini-batch
    _, _, _, error = select_groups(_result(4, 4, failed={0, 1, 2}), 4, _settings("skip", 8))
    assert error and "fewer than the 2 prompts" in error
    # no failure: nothing trimmed
    kept, failed, trimmed, error = select_groups(_result(4, 4), 4, _settings("skip", 8))
    assert error is None and len(kept) == 16 and not failed and not trimmed


def test_a_vanished_prompt_is_an_error():
    from megatron_r3.train.rollout_phase import select_groups

    _, _, _, error = select_groups(_result(4, 4, drop={1}), 4, _settings("skip", 4))
    assert error and "prompts [1] came back neither with samples nor as failures" in error
