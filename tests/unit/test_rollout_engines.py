"""The rollout engine seam: the registry is what `--rollout-engine` offers, one registry line adds an engine that the
trainer-side factory builds (flags generated from its config dataclass), and every engine's `generate` rejects bad
prompts and arguments through the one shared check, with the same messages."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass

import pytest
import torch

from megatron_r3.rollout.base import RolloutEngine, RolloutResult, SamplingParams, check_generate_request
from megatron_r3.replay.config import ReplayConfig
from megatron_r3.rollout.config import RolloutConfig
from megatron_r3.rollout.engines import (
    ENGINES,
    Engine,
    add_rollout_arguments,
    engine_class,
    engine_config_class,
    rollout_flag_dests,
)
from megatron_r3.train.components import build_engine, check_engine_arguments, engine_setup


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


# ------------------------------------------------------------------------------------------------ a test-only engine
@dataclass
class FakeEngineConfig:
    """Fake engine (tests only)."""

    fake_replies: int = 3
    """Samples the fake engine pretends to serve."""

    def check(self):
        if self.fake_replies < 0:
            raise ValueError(f"--fake-replies {self.fake_replies}: must be >= 0")


class FakeEngine(RolloutEngine):
    built: list = []

    def __init__(self, setup):
        self.setup = setup

    @classmethod
    def build(cls, setup):
        engine = cls(setup)
        cls.built.append(engine)
        return engine

    def generate(self, prompts, sampling, *, samples_per_prompt=1, return_routes=False, routes_start_len=None):
        check_generate_request(prompts, sampling, samples_per_prompt, routes_start_len)
        return RolloutResult(samples=[])

    def update_weights(self, named_tensors):
        pass

    def close(self):
        pass


@pytest.fixture
def fake_registered(monkeypatch):
    monkeypatch.setitem(ENGINES, "fake", Engine(f"{__name__}:FakeEngine", f"{__name__}:FakeEngineConfig"))  # one line
    FakeEngine.built = []
    return FakeEngine


def rollout_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_rollout_arguments(parser)
    return parser


# ------------------------------------------------------------------------------------------------ registry
def test_rollout_engine_choices_are_the_registry():
    from megatron_r3.train.arguments import build_parser

    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "rollout_engine"]
    assert tuple(action.choices) == tuple(ENGINES) == ("hf", "sglang")
    assert action.default == RolloutConfig.rollout_engine in ENGINES
    dests = {a.dest for a in parser._actions}
    assert rollout_flag_dests() <= dests  # what the preflight's YAML key check knows is on the command line
    for name in ENGINES:  # every registered engine's flags are on the trainer's command line
        assert issubclass(engine_class(name), RolloutEngine)
        if engine_config_class(name) is not None:
            assert {f.name for f in dataclasses.fields(engine_config_class(name))} <= dests
    assert {"rollout_dtype", "sglang_url", "weight_sync_dir"} <= rollout_flag_dests()
    args = parser.parse_args([])
    for config_class in [RolloutConfig] + [engine_config_class(n) for n in ENGINES]:
        if config_class is not None:  # defaults written once: the dataclass's are the parser's
            assert config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}) \
                == config_class()


def test_an_unknown_engine_is_named_with_the_registered_ones():
    with pytest.raises(ValueError, match=exact("unknown rollout engine 'vllm'; registered: hf, sglang "
                                               "(megatron_r3.rollout.engines.ENGINES)")):
        engine_class("vllm")
    with pytest.raises(SystemExit):
        rollout_parser().parse_args(["--rollout-engine", "vllm"])


def test_a_registry_entry_must_name_a_rolloutengine_and_a_dataclass(monkeypatch):
    monkeypatch.setitem(ENGINES, "bogus", Engine(f"{__name__}:FakeEngineConfig", f"{__name__}:FakeEngine"))
    with pytest.raises(TypeError, match=exact(f"rollout engine 'bogus' ({__name__}:FakeEngineConfig) is not a "
                                              "RolloutEngine subclass")):
        engine_class("bogus")
    with pytest.raises(TypeError, match=exact(f"rollout engine 'bogus': config {__name__}:FakeEngine is not a "
                                              "dataclass")):
        engine_config_class("bogus")


def test_the_registry_and_the_config_modules_import_no_torch():
    import subprocess
    import sys

    code = ("import sys; from megatron_r3.rollout.engines import rollout_flag_dests; rollout_flag_dests(); "
            "print(sorted(m for m in ('torch', 'numpy', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------ one line adds one
def test_a_registered_engine_is_built_by_the_trainer_factory(fake_registered):
    args = rollout_parser().parse_args(["--rollout-engine", "fake", "--fake-replies", "5", "--rollout-dtype", "fp32"])
    args.seed, args.grpo_prompts_per_step, args.grpo_group_size, args.no_progress = 3, 2, 4, True
    vars(args).update(dataclasses.asdict(ReplayConfig(router_replay="R3", collect_routing_agreement=False)))
    check_engine_arguments(args)
    setup = engine_setup(args, hf_config="the hf config")
    engine = build_engine(setup)
    assert fake_registered.built == [engine]
    assert engine.setup.config == FakeEngineConfig(fake_replies=5)
    assert engine.setup.rollout == RolloutConfig(rollout_engine="fake", rollout_dtype="fp32")
    assert (engine.setup.hf_config, engine.setup.seed, engine.setup.max_batch_size, engine.setup.progress,
            engine.setup.require_routes) == ("the hf config", 3, 8, False, True)
    args.fake_replies = -1
    with pytest.raises(ValueError, match=exact("--fake-replies -1: must be >= 0")):
        check_engine_arguments(args)


def test_sglang_flag_checks_come_from_its_config():
    parser = rollout_parser()
    args = parser.parse_args(["--rollout-engine", "sglang"])
    with pytest.raises(ValueError, match=exact("--rollout-engine sglang needs --sglang-url URL [URL ...] or "
                                               "--sglang-address-file FILE")):
        check_engine_arguments(args)
    args = parser.parse_args(["--rollout-engine", "sglang", "--sglang-url", "h:1", "--weight-sync", "disk"])
    with pytest.raises(ValueError, match=exact("--weight-sync disk needs --weight-sync-dir DIR (storage every SGLang "
                                               "server can read)")):
        check_engine_arguments(args)
    check_engine_arguments(parser.parse_args(["--weight-sync", "disk"]))  # the hf engine ignores SGLang's flags


# ------------------------------------------------------------------------------------------------ shared checks
BAD_CALLS = [
    (dict(prompts=[[1, 2], []]), ValueError, "prompt 1 is empty; every prompt needs at least one token"),
    (dict(prompts=[[[1, 2]]]), ValueError, "prompt 0 must be a 1-D sequence of token ids, got shape (1, 2)"),
    (dict(prompts=[[1.5, 2.0]]), ValueError, "prompt 0 must hold integer token ids, got torch.float32"),
    (dict(prompts=[[1, 16]]), ValueError, "prompt 0 holds token id 16, outside the vocabulary [0, 16)"),
    (dict(prompts=[[-1, 2]]), ValueError, "prompt 0 holds token id -1, outside the vocabulary [0, 16)"),
    (dict(samples_per_prompt=0), ValueError, "samples_per_prompt must be a positive int, got 0"),
    (dict(samples_per_prompt=True), ValueError, "samples_per_prompt must be a positive int, got True"),
    (dict(sampling={"temperature": 1.0}), TypeError, "sampling must be a SamplingParams, got dict"),
    (dict(routes_start_len=[3]), ValueError, "routes_start_len[0] = 3 must be an int in [0, 2] (the prompt's length), "
                                             "as SGLang requires of routed_experts_start_len"),
    (dict(routes_start_len=[0, 0]), ValueError, "routes_start_len has 2 entries for 1 prompts; give one per prompt"),
]


def _call(engine_generate, prompts=((1, 2),), sampling=None, samples_per_prompt=1, routes_start_len=None):
    sampling = SamplingParams(max_new_tokens=2) if sampling is None else sampling
    return engine_generate([list(p) for p in prompts], sampling, samples_per_prompt=samples_per_prompt,
                           return_routes=True, routes_start_len=routes_start_len)


def _hf_engine():
    pytest.importorskip("transformers")
    from transformers import Qwen3MoeConfig

    from megatron_r3.rollout.engines.hf import HFRolloutEngine

    torch.manual_seed(0)
    return HFRolloutEngine(Qwen3MoeConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
        mlp_only_layers=[0], max_position_embeddings=8), dtype="fp32", progress=False)


def _sglang_engine():
    pytest.importorskip("requests")
    from megatron_r3.rollout.engines.sglang.engine import SGLangEngine

    # no server: the shared check must refuse before any request is sent
    return SGLangEngine(["http://127.0.0.1:9"], num_layers=2, topk=2, num_experts=4, vocab_size=16,
                        wait_for_health=False)


@pytest.fixture(scope="module", params=["shared", "hf", "sglang"])
def generate(request):
    if request.param == "shared":
        def call(prompts, sampling, *, samples_per_prompt, return_routes, routes_start_len):
            return check_generate_request(prompts, sampling, samples_per_prompt, routes_start_len, vocab_size=16)
        yield call
        return
    engine = _hf_engine() if request.param == "hf" else _sglang_engine()
    yield engine.generate
    engine.close()


@pytest.mark.parametrize("call, error, message", BAD_CALLS, ids=[m[:40] for _, _, m in BAD_CALLS])
def test_every_engine_rejects_bad_calls_with_the_shared_message(generate, call, error, message):
    with pytest.raises(error, match=exact(message)):
        _call(generate, **call)


def test_the_shared_check_returns_int64_prompts_and_start_rows():
    request = check_generate_request([[1, 2, 3], torch.tensor([4], dtype=torch.int32)], SamplingParams(), 2, [1, 0])
    assert [p.dtype for p in request.prompts] == [torch.int64, torch.int64]
    assert [p.tolist() for p in request.prompts] == [[1, 2, 3], [4]]
    assert request.routes_start_len == [1, 0]
    assert check_generate_request([[1]], SamplingParams(), 1).routes_start_len == [0]
    with pytest.raises(ValueError, match=exact("prompt 0 has 8 tokens but the model's max_position_embeddings is 8: "
                                               "a prompt may have at most 7 tokens to leave room for one generated "
                                               "token")):
        check_generate_request([list(range(8))], SamplingParams(), 1, max_positions=8)
