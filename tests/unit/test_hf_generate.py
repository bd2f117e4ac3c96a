"""The fixed-shape decode loop (megatron_r3.rollout.hf_generate) against the engine's first loop, on CPU in fp32.

Tolerance of logprobs between the two loops: both compute the same logits up to float rounding (the static cache
makes attention run over masked, unused slots, so reductions see other lengths and kernels); the first loop itself
agrees with an uncached full-sequence forward only to 2e-5 (test_hf_engine), so 2e-5 is the bound used here too.
Planted bugs move them by orders of magnitude more (a position off by one: > 1e-2).
"""

import copy
import re

import pytest
import torch

pytest.importorskip("transformers")
from tests.unit.test_hf_engine import PROMPTS, random_model  # noqa: E402

from megatron_r3.rollout.base import SamplingParams  # noqa: E402
from megatron_r3.rollout.engines.hf import HFRolloutEngine  # noqa: E402
from megatron_r3.rollout.engines.hf_config import HFEngineConfig
from megatron_r3.rollout.hf_generate import generate_batch_static, sample_on_device  # noqa: E402
from megatron_r3.rollout.sampling import sample_tokens  # noqa: E402

LOGPROB_ATOL = 2e-5


@pytest.fixture(scope="module")
def base_model():
    return random_model(0)


def engine(model, static: bool, interval: int = 4, **kwargs):
    built = HFRolloutEngine(copy.deepcopy(model), dtype=torch.float32, progress=False, **kwargs)
    built.generate_config = HFEngineConfig(hf_static_decode="on" if static else "off", hf_stop_check_interval=interval)
    return built


def both(model, params, prompts=PROMPTS, samples_per_prompt=2, **kwargs):
    """Samples of the first loop and of the static loop for the same call."""
    return [engine(model, static, **kwargs).generate(prompts, params, samples_per_prompt=samples_per_prompt,
                                                     return_routes=True).samples for static in (False, True)]


def assert_same(old, new):
    assert len(old) == len(new)
    for a, b in zip(old, new):
        assert torch.equal(a.tokens, b.tokens), (a.tokens.tolist(), b.tokens.tolist())
        assert (a.finish_reason, a.prompt_length, a.prompt_index) == (b.finish_reason, b.prompt_length, b.prompt_index)
        torch.testing.assert_close(b.response_logprobs, a.response_logprobs, atol=LOGPROB_ATOL, rtol=0)
        assert torch.equal(a.routes.expert_ids, b.routes.expert_ids)
        assert (a.routes.start_row, a.routes.num_experts, a.routes.source) == (
            b.routes.start_row, b.routes.num_experts, b.routes.source)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, 20, 0.9), (1.3, 5, 1.0), (0.5, -1, 0.6)])
def test_device_sampler_is_sample_tokens_bitwise(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(7, 128) * 3
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    old_gen, new_gen = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(3):  # the generators also advance identically
        a = sample_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=old_gen)
        b = sample_on_device(logits, params, new_gen)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(old_gen.get_state(), new_gen.get_state())


def test_seeded_sampling_equals_first_loop_while_no_sequence_finishes(base_model):
    # prompts of 1..9 tokens (left padding), no stop token, same budget: the batch never shrinks in the first loop
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=9, seed=3)
    old, new = both(base_model, params)
    assert_same(old, new)
    assert len({s.tokens[s.prompt_length:].tolist().__repr__() for s in new}) == len(new)  # really sampled


def test_greedy_with_stop_tokens_and_context_cap_equals_first_loop(base_model):
    # stops at different steps, and a context cap that gives rows different budgets ("length" at different steps)
    model = copy.deepcopy(base_model)
    model.config.max_position_embeddings = 16
    prompts = PROMPTS + [list(range(1, 14))]
    params = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(13, 14, 15, 40, 41))
    old, new = both(model, params, prompts=prompts, samples_per_prompt=1)
    assert_same(old, new)
    lengths = {(s.finish_reason, s.response_length) for s in new}
    assert ("length", 3) in lengths and ("length", 10) in lengths and "stop" in {r for r, _ in lengths}, lengths


def test_sampled_with_stops_equals_first_loop_until_the_first_sequence_finishes(base_model):
    params = SamplingParams(temperature=0.8, top_k=30, max_new_tokens=12, stop_token_ids=(7, 8, 9, 10, 11), seed=5)
    old, new = both(base_model, params, samples_per_prompt=3)
    first_finish = min(s.response_length for s in old)  # the batch is equal through this many sampled tokens
    assert first_finish < 12
    for a, b in zip(old, new):
        n = a.prompt_length + first_finish
        assert torch.equal(a.tokens[:n], b.tokens[:n])
        torch.testing.assert_close(b.response_logprobs[:first_finish], a.response_logprobs[:first_finish],
                                   atol=LOGPROB_ATOL, rtol=0)
        assert torch.equal(a.routes.expert_ids[: n - 1], b.routes.expert_ids[: n - 1])
    # stop handling: a "stop" sample ends at its first stop token, a "length" one has none and the full budget
    for s in new:
        response = s.response_ids.tolist()
        hits = [i for i, t in enumerate(response) if t in params.stop_token_ids]
        if s.finish_reason == "stop":
            assert hits == [len(response) - 1]
        else:
            assert hits == [] and len(response) == 12
        assert s.routes.num_rows == s.tokens.numel() - 1
    assert {s.finish_reason for s in new} == {"stop", "length"}
    # reproducible from the seed, and the seed matters
    again = engine(base_model, True).generate(PROMPTS, params, samples_per_prompt=3, return_routes=True).samples
    assert all(torch.equal(a.tokens, b.tokens) and torch.equal(a.response_logprobs, b.response_logprobs)
               and torch.equal(a.routes.expert_ids, b.routes.expert_ids) for a, b in zip(new, again))
    other = engine(base_model, True).generate(PROMPTS, SamplingParams(**{**params.__dict__, "seed": 6}),
                                              samples_per_prompt=3).samples
    assert any(not torch.equal(a.tokens, b.tokens) for a, b in zip(new, other))


def test_eager_attention_mask_equals_sdpa(base_model):
    params = SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(13, 14))
    sdpa = engine(base_model, True).generate(PROMPTS, params, return_routes=True).samples
    eager_engine = engine(base_model, True)
    eager_engine.model.set_attn_implementation("eager")
    eager = eager_engine.generate(PROMPTS, params, return_routes=True).samples
    assert_same(sdpa, eager)


class _Bar:
    def __init__(self):
        self.n = 0

    def update(self, n):
        self.n += n


def count_host_reads(monkeypatch, run):
    """Run `run()` counting every tensor -> Python read (.item(), .tolist(), bool/int/float/index of a tensor); on a
    GPU each is a device sync. (`.numpy()` is left out: it only takes CPU tensors, i.e. data already on the host.)"""
    counts = {"n": 0, "depth": 0}
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(*args, _original=original, **kwargs):
            # one read counts once: a torch function mode (the CPU support's, process-wide once megatron ran on
            # this CPU) re-dispatches the same method call through this wrapper
            counts["n"] += counts["depth"] == 0
            counts["depth"] += 1
            try:
                return _original(*args, **kwargs)
            finally:
                counts["depth"] -= 1

        monkeypatch.setattr(torch.Tensor, name, counted)
    result = run()
    monkeypatch.undo()
    return counts["n"], result


@pytest.mark.parametrize("interval,stop,expect", [
    (4, (), dict(decode_forwards=9, host_checks=2)),  # 10 steps, checks after steps 4 and 8, never all done
    (1, (), dict(decode_forwards=9, host_checks=9)),  # a check every step: the counter sees each one
    (4, tuple(range(128)), dict(decode_forwards=3, host_checks=1)),  # all stop at once: 3 wasted forwards, then out
])
def test_decode_loop_reads_the_host_only_at_its_checks(base_model, monkeypatch, interval, stop, expect):
    model = copy.deepcopy(base_model)
    chunk = [(i, torch.tensor(p)) for i, p in enumerate(PROMPTS)]
    params = SamplingParams(temperature=1.0, max_new_tokens=10, stop_token_ids=stop, seed=0)
    stats, bar = {}, _Bar()

    def run():
        return generate_batch_static(model, chunk, 0, params, torch.Generator().manual_seed(0), True, bar,
                                     HFEngineConfig(hf_stop_check_interval=interval), stats)

    reads, samples = count_host_reads(monkeypatch, run)
    assert stats == expect
    assert reads == stats["host_checks"] + 2  # + the two result lists read once per batch at the end
    assert bar.n == len(chunk) and len(samples) == len(chunk)
    if stop:
        assert all(s.response_length == 1 and s.finish_reason == "stop" for s in samples)


def test_bad_settings_raise_clear_errors(base_model):
    with pytest.raises(ValueError, match=re.escape("--hf-stop-check-interval must be a positive int, got 0")):
        HFEngineConfig(hf_stop_check_interval=0)
    with pytest.raises(ValueError, match="--hf-cuda-graph captures the static decode loop: drop --hf-static-decode off"):
        HFEngineConfig(hf_static_decode="off", hf_cuda_graph=True).check()
    assert [HFEngineConfig(hf_static_decode=mode).static_decode(device) for mode in ("auto", "on", "off")
            for device in ("cuda", "cpu")] == [True, False, True, True, False, False]
    chunk = [(0, torch.tensor(PROMPTS[0]))]
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="hf_cuda_graph needs the model on a CUDA device, it is on cpu"):
        generate_batch_static(base_model, chunk, 0, params, None, False, _Bar(), HFEngineConfig(hf_cuda_graph=True))
    model = copy.deepcopy(base_model)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="for 'sdpa' or 'eager' attention; the model uses 'flash_attention_2'"):
        generate_batch_static(model, chunk, 0, params, None, False, _Bar(), HFEngineConfig())


def test_settings_are_flags_of_the_typed_config():
    import argparse

    from megatron_r3.platform.typed_config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, HFEngineConfig, "hf generate")
    assert config_from_args(HFEngineConfig, parser.parse_args([])) == HFEngineConfig()
    given = parser.parse_args(["--hf-static-decode", "off", "--hf-stop-check-interval", "8", "--hf-cuda-graph"])
    assert config_from_args(HFEngineConfig, given) == HFEngineConfig(
        hf_static_decode="off", hf_stop_check_interval=8, hf_cuda_graph=True)
    from megatron_r3.rollout.engines import engine_config_class

    assert engine_config_class("hf") is HFEngineConfig  # the hf engine's flags are these
