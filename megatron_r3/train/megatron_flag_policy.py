"""Which of megatron's ~800 flags `pretrain_grpo.py` honours; every other one given a value is refused.

`pretrain_grpo.py` parses megatron's whole command line but runs its own data, rollout and training loop, so most of
megatron's flags (its data loaders, evaluation loop, async/non-torch_dist checkpoints, one-logger, inference server,
...) would parse and silently do nothing. A flag is honoured when its value reaches the run:

- `READ_BY_TRAINER`: read from the namespace by megatron_r3 (`tests/unit/test_megatron_flag_policy.py` checks each
  name against the package source, and that every megatron flag the package reads is honoured);
- a field of megatron's `TransformerConfig` / `MLATransformerConfig`: `core_transformer_config_from_args` copies it
  into the model config;
- `DERIVED`: megatron's `validate_args` or `core_transformer_config_from_args` turn it into one of the above.

Any other megatron flag whose value differs from megatron's default (on the command line or in YAML) is an error
naming the flag and what to use instead (`HINTS`), raised right after parsing, before the model config is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Iterable, Mapping, Optional

READ_BY_TRAINER = frozenset({
    # optimizer and learning-rate schedule (train/components.py)
    "optimizer", "sgd_momentum", "lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad",
    "lr_decay_style", "lr_warmup_init", "lr_warmup_iters", "use_distributed_optimizer",
    "use_checkpoint_opt_param_scheduler", "override_opt_param_scheduler",
    # batch, steps, checkpoints, logging (train/trainer.py, train/arguments.py, train/metrics_log.py)
    "global_batch_size", "micro_batch_size", "seq_length", "train_iters", "seed", "log_interval",
    "load", "save", "save_interval", "no_load_optim", "no_load_rng",
    "tensorboard_dir", "wandb_project", "wandb_exp_name", "wandb_save_dir", "wandb_entity",
    # GRPO / RL settings of megatron's RL trainer that mean the same here
    "grpo_group_size", "grpo_prompts_per_step", "grpo_iterations", "grpo_kl_beta", "grpo_clamp_eps_lower",
    "grpo_clamp_eps_upper", "grpo_entropy_term_weight", "rl_default_temperature", "rl_default_top_p",
    "rl_default_top_k", "rl_importance_sampling_truncation_coef", "rl_inference_logprobs_is_correction",
    # model: written from the HF config (train/arguments.py apply_hf_architecture) or read to build the GPTModel
    "make_vocab_size_divisible_by", "max_position_embeddings", "num_experts", "group_query_attention",
    "position_embedding_type", "swiglu", "untie_embeddings_and_output_weights", "no_persist_layer_norm",
    "padded_vocab_size", "vocab_size",
})

DERIVED = {
    "num_layers_per_virtual_pipeline_stage": "validate_args -> virtual_pipeline_model_parallel_size",
    "num_virtual_stages_per_pipeline_rank": "validate_args -> virtual_pipeline_model_parallel_size",
    "recompute_activations": "validate_args -> recompute_granularity selective",
    "decoder_first_pipeline_num_layers": "core_transformer_config_from_args -> num_layers_in_first_pipeline_stage",
    "decoder_last_pipeline_num_layers": "core_transformer_config_from_args -> num_layers_in_last_pipeline_stage",
    "bias_gelu_fusion": "core_transformer_config_from_args -> bias_activation_fusion",
    "bias_swiglu_fusion": "core_transformer_config_from_args -> bias_activation_fusion",
}

# TransformerConfig fields that would reach the model config but that no family builds: megatron's MTP block. The
# model is the HF checkpoint's decoder (mtp_num_layers stays None); a checkpoint's MTP tensors are refused on load
# or skipped with --mtp-checkpoint-tensors skip (megatron_r3/model/hf_load_config.py).
MTP_FIELDS = frozenset({"mtp_num_layers", "mtp_loss_scaling_factor", "mtp_use_repeated_layer", "mtp_detach_heads",
                        "mtp_hybrid_override_pattern", "mtp_standalone"})
# Values of a refused flag that mean the same as its default (no MTP layers).
SAME_AS_DEFAULT = {"mtp_num_layers": (0,)}

# Flags only the supervised warm-up (train/sft_warmup.py) reads.
SFT_WARMUP_READS = frozenset({"eval_interval", "exit_duration_in_mins"})

_DATA = "pretrain_grpo.py reads prompts from --prompt-data FILE (JSONL/parquet) or a built-in --task"
_TOKENIZER = "the tokenizer comes from --tokenizer-dir (default: --hf-checkpoint)"
_DDP = "the policy's DistributedDataParallel settings are fixed in megatron_r3/train/components.py"
_SCHEDULE = "the learning-rate schedule takes --lr, --min-lr, --lr-decay-style, --lr-warmup-iters, --lr-warmup-init"
_EVAL = "GRPO has no evaluation loop: reward/mean of every step's rollout is logged in metrics.jsonl"
_CKPT = "checkpoints are saved synchronously in megatron's torch_dist format (megatron_r3/train/checkpoint.py)"
_MTP = ("no model family builds MTP layers (the model is the checkpoint's decoder); a checkpoint's MTP tensors are "
        "refused on load unless --mtp-checkpoint-tensors skip, and HF exports then contain no MTP layers")
_LOG = "metrics.jsonl, TensorBoard and W&B get every metric at every step; the console line every --log-interval"

HINTS = {
    "yaml_cfg": "use --config FILE.yaml (keys are the flag names with '_')",
    "async_save": _CKPT, "ckpt_format": _CKPT, "auto_detect_ckpt_format": _CKPT, "ckpt_fully_parallel_save": _CKPT,
    "ckpt_fully_parallel_load": _CKPT, "ckpt_assume_constant_structure": _CKPT, "use_persistent_ckpt_worker": _CKPT,
    "non_persistent_save_interval": _CKPT, "no_save_optim": _CKPT, "no_save_rng": _CKPT, "finetune": _CKPT,
    "eval_interval": _EVAL, "eval_iters": _EVAL, "skip_train": _EVAL, "full_validation": _EVAL,
    "exit_interval": "stop after N steps with --train-iters N",
    "exit_duration_in_mins": "stop after N steps with --train-iters N",
    "exit_signal_handler": "stop after N steps with --train-iters N",
    "data_path": _DATA, "train_data_path": _DATA, "valid_data_path": _DATA, "test_data_path": _DATA,
    "mock_data": _DATA, "split": _DATA, "dataloader_type": _DATA, "num_workers": _DATA, "data_cache_path": _DATA,
    "tokenizer_type": _TOKENIZER, "tokenizer_model": _TOKENIZER, "vocab_file": _TOKENIZER, "merge_file": _TOKENIZER,
    "overlap_grad_reduce": _DDP, "overlap_param_gather": _DDP, "ddp_bucket_size": _DDP, "grad_reduce_in_bf16": _DDP,
    "accumulate_allreduce_grads_in_fp32": _DDP, "check_for_nan_in_loss_and_grad": _DDP, "use_megatron_fsdp": _DDP,
    "use_torch_fsdp2": _DDP, "align_grad_reduce": _DDP, "align_param_gather": _DDP,
    "lr_warmup_fraction": _SCHEDULE, "lr_warmup_samples": _SCHEDULE, "lr_decay_iters": _SCHEDULE,
    "lr_decay_samples": _SCHEDULE, "lr_wsd_decay_iters": _SCHEDULE, "lr_wsd_decay_samples": _SCHEDULE,
    "lr_wsd_decay_style": _SCHEDULE, "start_weight_decay": "weight decay is constant: use --weight-decay",
    "end_weight_decay": "weight decay is constant: use --weight-decay",
    "weight_decay_incr_style": "weight decay is constant: use --weight-decay",
    "train_samples": "give the number of GRPO steps with --train-iters",
    "rampup_batch_size": "the batch is --grpo-prompts-per-step x --grpo-group-size samples every step",
    "tensorboard_log_interval": _LOG, "tensorboard_queue_size": _LOG, "log_throughput": _LOG,
    "log_params_norm": _LOG, "log_timers_to_tensorboard": _LOG, "log_memory_to_tensorboard": _LOG,
    "log_validation_ppl_to_tensorboard": _LOG, "log_world_size_to_tensorboard": _LOG,
    "log_loss_scale_to_tensorboard": _LOG, "log_num_zeros_in_grad": _LOG, "timing_log_level": _LOG,
    "enable_one_logger": _LOG, "one_logger_project": _LOG, "one_logger_run_name": _LOG,
    "loss_scale": "fp16 loss scaling is not configurable here: train in bf16 (--trainer-dtype bf16)",
    "initial_loss_scale": "fp16 loss scaling is not configurable here: train in bf16 (--trainer-dtype bf16)",
    "perform_rl_step": "pretrain_grpo.py is the RL trainer; megatron's own RL loop flags do not apply",
    **{dest: _MTP for dest in MTP_FIELDS},
}
_DEFAULT_HINT = ("pretrain_grpo.py runs its own data, rollout and training loop and never reads it; remove it "
                 "(megatron_r3/train/megatron_flag_policy.py lists the megatron flags it honours)")


def transformer_config_fields() -> frozenset:
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return frozenset(field.name for field in dataclasses.fields(MLATransformerConfig))


def honoured_flags(extra: Iterable[str] = ()) -> frozenset:
    """Dests of the megatron flags whose value reaches the run."""
    return READ_BY_TRAINER | frozenset(DERIVED) | (transformer_config_fields() - MTP_FIELDS) | frozenset(extra)


@functools.lru_cache(maxsize=1)
def megatron_actions() -> dict[str, argparse.Action]:
    """dest -> action of megatron's own parser (no megatron_r3 flags)."""
    from megatron_r3.platform.python_compat import apply_python_compat

    apply_python_compat()
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_megatron_arguments(parser)
    return {action.dest: action for action in parser._actions if action.option_strings}


def megatron_defaults() -> dict[str, object]:
    """dest -> value of megatron's parser given no flags (parser-level defaults included). Not cached: some defaults
    come from the environment (--inprocess-active-world-size is WORLD_SIZE)."""
    from megatron.training.arguments import add_megatron_arguments

    megatron_actions()  # the python compat shims
    parser = argparse.ArgumentParser(add_help=False)
    add_megatron_arguments(parser)
    return vars(parser.parse_args([]))


def ignored_flags(extra_honoured: Iterable[str] = ()) -> dict[str, argparse.Action]:
    """dest -> action of every megatron flag pretrain_grpo.py does not honour."""
    honoured = honoured_flags(extra_honoured)
    return {dest: action for dest, action in megatron_actions().items() if dest not in honoured}


def ignored_flag_message(action: argparse.Action, value) -> str:
    """`--flag value: not supported by pretrain_grpo.py; <what to use instead>` (a switch shows no value)."""
    shown = "" if action.nargs == 0 else f" {' '.join(map(str, value)) if isinstance(value, list) else value}"
    return f"{action.option_strings[0]}{shown}: not supported by pretrain_grpo.py; {HINTS.get(action.dest, _DEFAULT_HINT)}"


def check_ignored_flags(args: argparse.Namespace, extra_honoured: Iterable[str] = (),
                        defaults: Optional[Mapping[str, object]] = None) -> None:
    """Raise ValueError for the first megatron flag the run ignores whose value (from the command line or --config)
    differs from megatron's own default (`defaults`: `megatron_defaults()` unless given). Run on the parsed
    arguments, before `validate_args` changes any."""
    defaults = megatron_defaults() if defaults is None else defaults
    for dest, action in sorted(ignored_flags(extra_honoured).items()):
        value = getattr(args, dest, defaults.get(dest))
        if value != defaults.get(dest) and value not in SAME_AS_DEFAULT.get(dest, ()):
            raise ValueError(ignored_flag_message(action, value))
