"""Build megatron-core `GPTModel` chunks (one per virtual pipeline stage) with the replay-aware layer spec."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from megatron_r3.model.specs import replay_decoder_block_spec
from megatron_r3.platform.distributed import device
from megatron_r3.platform.parallel_context import ParallelContext


def build_gpt_chunks(
    config,
    parallel: ParallelContext,
    *,
    vocab_size: int,
    max_sequence_length: int,
    position_embedding_type: str = "rope",
    rotary_base: int = 10000,
    rotary_percent: float = 1.0,
    share_embeddings_and_output_weights: bool = False,
    use_transformer_engine: bool | None = None,
    fused_attention: bool | None = None,
    block_spec_of=replay_decoder_block_spec,
) -> list[GPTModel]:
    """This rank's model chunks: one per virtual pipeline stage of `parallel` (a list of one without VP), on this
    rank's device, built with `parallel`'s process groups (megatron's mpu groups when it carries none).
    `fused_attention`: see `specs.replay_decoder_block_spec` (None: chosen from the config and the device).
    `block_spec_of(config, vp_stage=, use_transformer_engine=, fused_attention=)`: the decoder block spec of one
    chunk (a model family's `decoder_block_spec`; default megatron's GPT spec with the replay router)."""
    chunks = []
    for vp_stage in parallel.vp_stages():
        spec = block_spec_of(config, use_transformer_engine=use_transformer_engine, vp_stage=vp_stage,
                             fused_attention=fused_attention)
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=parallel.is_first_pipeline_stage(vp_stage),
            post_process=parallel.is_last_pipeline_stage(vp_stage),
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,
            rotary_base=rotary_base,
            rotary_percent=rotary_percent,
            vp_stage=vp_stage,
            pg_collection=parallel.groups,
        )
        chunks.append(model.to(device()))
    return chunks
