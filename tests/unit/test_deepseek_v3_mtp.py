"""MTP layers of a DeepSeek-V3 / GLM-4.5 checkpoint (`model.layers.{num_hidden_layers + i}.*`, i <
`num_nextn_predict_layers`) are not built: loading refuses them with one message naming them and the flag, or, with
`--mtp-checkpoint-tensors skip`, loads and exports everything else bit for bit and says how many it skipped. Decoder
routes address the decoder's layers only."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_r3.model import families  # noqa: E402
from megatron_r3.model.families import arch_from_hf_config, family_for  # noqa: E402
from megatron_r3.model.hf_load_config import HFLoadConfig, check_mtp_checkpoint_tensors  # noqa: E402
from megatron_r3.model.hf_mapping import MappingError  # noqa: E402
from megatron_r3.model.hf_module import hf_state_dict_to_checkpoint_names  # noqa: E402
from megatron_r3.model.weights import export_hf_weights, load_hf_weights  # noqa: E402
from megatron_r3.replay.schedule import ReplayRouters  # noqa: E402
from tests.unit.test_deepseek_v3 import make_hf  # noqa: E402

# a DeepSeek-V3 MTP layer's own tensors and one of its MoE block (HF's layout; shapes do not matter, never read)
MTP_NAMES = ("model.layers.3.enorm.weight", "model.layers.3.hnorm.weight", "model.layers.3.eh_proj.weight",
             "model.layers.3.shared_head.norm.weight", "model.layers.3.mlp.gate.weight")
REFUSED = ("the checkpoint holds 5 MTP tensors (model.layers.3.*: num_nextn_predict_layers=1) that the deepseek_v3 "
           "model does not build; pass --mtp-checkpoint-tensors skip to load the decoder without them (HF exports "
           "of the trained model will then not contain them)")
SKIPPED = ("--mtp-checkpoint-tensors skip: skipped 5 MTP tensors (model.layers.3.*: num_nextn_predict_layers=1) that "
           "the deepseek_v3 model does not build; HF exports of the trained model will not contain them\n")


@pytest.fixture(scope="module")
def mtp_model(world_of_one):
    """(arch, decoder checkpoint, checkpoint with MTP tensors, megatron config, chunks) of a 3-layer DeepSeek-V3 with
    num_nextn_predict_layers=1."""
    source = make_hf("q_lora_groups")
    source.config.num_nextn_predict_layers = 1
    arch = arch_from_hf_config(source.config)
    assert arch.num_mtp_layers == 1 and arch.num_layers == 3
    decoder = dict(hf_state_dict_to_checkpoint_names(source))
    with_mtp = dict(decoder)
    for name in MTP_NAMES:
        with_mtp[name] = torch.ones(8, 64)
    config, chunks = families.build_from_hf_config(source.config, world_of_one, use_cpu_initialization=True)
    return arch, decoder, with_mtp, config, chunks


def test_mtp_tensors_are_refused_by_default(mtp_model, world_of_one):
    arch, _, with_mtp, _, chunks = mtp_model
    assert HFLoadConfig().mtp_checkpoint_tensors == "refuse"
    with pytest.raises(MappingError) as error:
        load_hf_weights(chunks, with_mtp, arch, world_of_one)
    assert str(error.value) == REFUSED


def test_skip_loads_and_exports_the_decoder_bit_for_bit_and_counts(mtp_model, world_of_one, capsys):
    arch, decoder, with_mtp, _, chunks = mtp_model
    for chunk in chunks:  # start from values that differ from the checkpoint everywhere
        for param in chunk.parameters():
            param.data.fill_(7.0)
    skip = HFLoadConfig(mtp_checkpoint_tensors="skip")
    capsys.readouterr()
    load_hf_weights(chunks, with_mtp, arch, world_of_one, skip)
    assert capsys.readouterr().out == SKIPPED  # said once
    exported = dict(export_hf_weights(chunks, arch, world_of_one, receivers="all"))
    assert sorted(exported) == sorted(decoder)
    assert all(torch.equal(exported[name], decoder[name]) for name in decoder)
    assert check_mtp_checkpoint_tensors(arch, with_mtp, skip) == len(MTP_NAMES)
    assert check_mtp_checkpoint_tensors(arch, decoder, HFLoadConfig()) == 0  # nothing to refuse


def test_decoder_routes_never_address_mtp_layers(mtp_model):
    """No MTP block is built, so every router is a decoder layer's: the route layer axis is num_hidden_layers."""
    arch, _, _, config, chunks = mtp_model
    assert config.mtp_num_layers is None
    assert not any(getattr(chunk, "mtp_process", False) for chunk in chunks)
    from megatron_r3.replay.router import ReplayTopKRouter

    every_router = [m for chunk in chunks for m in chunk.modules() if isinstance(m, ReplayTopKRouter)]
    assert len(every_router) == sum(arch.moe_layers) and not any(r.is_mtp_layer for r in every_router)
    routers = ReplayRouters(chunks)
    assert routers.layer_numbers == tuple(i + 1 for i, moe in enumerate(arch.moe_layers) if moe) == (2, 3)
    assert len(arch.moe_layers) == arch.num_layers == 3


def test_mtp_names_are_the_layers_after_the_decoder_only():
    family = family_for("deepseek_v3")
    source = make_hf("q_lora_groups")
    names = ["model.layers.2.mlp.gate.weight", "model.layers.3.enorm.weight", "model.layers.4.enorm.weight",
             "model.layers.30.enorm.weight"]
    source.config.num_nextn_predict_layers = 0
    assert family.mtp_checkpoint_names(arch_from_hf_config(source.config), names) == []
    source.config.num_nextn_predict_layers = 2
    assert family.mtp_checkpoint_names(arch_from_hf_config(source.config), names) == names[1:3]


def test_glm4_moe_checkpoint_mtp_tensors_are_refused():
    from transformers import Glm4MoeConfig

    from tests.unit.test_glm4_moe import CONFIG

    arch = arch_from_hf_config(Glm4MoeConfig(**{**CONFIG, "num_nextn_predict_layers": 1}))
    assert arch.num_mtp_layers == 1
    with pytest.raises(MappingError) as error:
        check_mtp_checkpoint_tensors(arch, ["model.norm.weight", "model.layers.3.eh_proj.weight"], HFLoadConfig())
    assert str(error.value).startswith("the checkpoint holds 1 MTP tensors (model.layers.3.*: "
                                       "num_nextn_predict_layers=1) that the glm4_moe model does not build;")


def test_conversion_tool_takes_the_flag():
    from tools.convert_hf_to_mcore import parse_args

    from megatron_r3.platform.typed_config import config_from_args

    base = ["--hf-dir", "in", "--out", "out"]
    assert config_from_args(HFLoadConfig, parse_args(base)).mtp_checkpoint_tensors == "refuse"
    args = parse_args(base + ["--mtp-checkpoint-tensors", "skip"])
    assert config_from_args(HFLoadConfig, args) == HFLoadConfig(mtp_checkpoint_tensors="skip")
    with pytest.raises(SystemExit):
        parse_args(base + ["--mtp-checkpoint-tensors", "load"])
