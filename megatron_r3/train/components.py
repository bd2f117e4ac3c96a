"""Everything a GRPO run is built from: parallel state, policy (DDP + optimizer + LR schedule), reference model,
rollout engine, tokenizer, prompts and reward. Built once by `build_training_setup(args)`.

The policy is megatron-core's `GPTModel` with the replay layer spec, wrapped in megatron's
`DistributedDataParallel`; gradients are finalised by megatron's `finalize_model_grads` (per-token loss mode:
divided by the mini-batch's global token count) and stepped by megatron's optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_r3.model.families import ModelArch, arch_from_hf_config, family_of, padded_vocab_size
from megatron_r3.model.hf_load_config import HFLoadConfig
from megatron_r3.model.weights import load_hf_weights
from megatron_r3.platform.distributed import initialize_model_parallel
from megatron_r3.platform.logging import get_logger
from megatron_r3.platform.parallel_context import ParallelContext, ParallelSizes
from megatron_r3.replay.config import ReplayConfig
from megatron_r3.replay.policy import replay_policy
from megatron_r3.replay.schedule import ReplayRouters
from megatron_r3.platform.typed_config import config_from_args
from megatron_r3.rollout.base import EngineSetup, PolicyWeights, SamplingParams
from megatron_r3.rollout.config import RolloutConfig
from megatron_r3.rollout.engines import engine_class, engine_config_class
from megatron_r3.train.rollout_phase import RolloutSettings

log = get_logger(__name__)


@dataclass
class TrainingSetup:
    args: object
    config: object
    arch: ModelArch
    chunks: list  # unwrapped GPTModel chunks (checkpoints, weight export)
    model: list  # DDP-wrapped chunks (schedules)
    optimizer: object
    scheduler: object
    routers: ReplayRouters
    vocab_size: int
    tokenizer: object
    sampler: object
    reward_fn: object
    parallel: ParallelContext  # this rank's place in the layout, its groups and the host group (built once)
    engine_setup: Optional[EngineSetup] = None  # every rank: what the engine is built and synced from
    engine: Optional[object] = None  # rank 0 only
    reference: Optional[list] = None
    reference_routers: Optional[ReplayRouters] = None
    eos_token_id: Optional[int] = None
    moe_layers: tuple = field(default_factory=tuple)

    def zero_grad(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def tokenize(self, records) -> list[list[int]]:
        from megatron_r3.train.data import tokenize_prompts

        return tokenize_prompts(self.tokenizer, records, max_length=self.args.seq_length - self.args.max_new_tokens)

    def rollout_settings(self, step: int) -> RolloutSettings:
        args = self.args
        sampling = SamplingParams(
            temperature=args.rl_default_temperature,
            top_p=args.rl_default_top_p if args.rl_default_top_p > 0 else 1.0,
            top_k=args.rl_default_top_k,
            max_new_tokens=args.max_new_tokens,
            stop_token_ids=(self.eos_token_id,) if self.eos_token_id is not None else (),
            seed=args.seed * 1_000_003 + step,  # a pure function of the step: resuming reproduces the rollout
        )
        return RolloutSettings(
            sampling=sampling,
            group_size=args.grpo_group_size,
            return_routes=engine_returns_routes(args),
            moe_layers=self.moe_layers,
            topk=self.arch.topk,
            route_fallback=args.route_fallback,
            failure_policy=self.engine_setup.rollout.rollout_failure_policy,
            global_batch_size=args.global_batch_size,
        )

    def sync_weights_to_engine(self) -> None:
        """Full HF-named weights from the sharded policy to the rollout engine on rank 0: the engine's collective
        `sync_weights`, called on every rank (each drives the export's gathers; rank 0 talks to the engine)."""
        engine_class(self.engine_setup.rollout.rollout_engine).sync_weights(
            self.engine, PolicyWeights(self.chunks, self.arch, self.args.hf_model_config, self.parallel),
            self.engine_setup)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def parallel_sizes(args) -> ParallelSizes:
    return ParallelSizes(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )


def initial_hf_weights(args, hf_config):
    """The run's starting weights as a HF checkpoint source: the checkpoint directory, or a randomly initialised
    Qwen3-MoE built identically on every rank from --seed (a tiny model for the demo and tests)."""
    if args.hf_checkpoint:
        return args.hf_checkpoint
    from transformers import AutoModelForCausalLM

    from megatron_r3.model.hf_module import hf_state_dict_to_checkpoint_names

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return dict(hf_state_dict_to_checkpoint_names(model))


def build_policy(args, config, arch, vocab_size, weights, parallel: ParallelContext):
    """The model chunks of the HF config's family (it chooses the model class, spec and model arguments)."""
    family = family_of(args.hf_model_config)
    chunks = family.build_chunks(config, parallel,
                                 **{**family.model_kwargs(args.hf_model_config), "vocab_size": vocab_size})
    load_hf_weights(chunks, weights, arch, parallel, config_from_args(HFLoadConfig, args))
    return chunks


# Hooks megatron's schedules read from the model config; the policy's DDP wrap sets them to bound methods of its
# DistributedDataParallel (which holds process groups).
SCHEDULE_HOOKS = ("no_sync_func", "grad_sync_func", "param_sync_func", "finalize_model_grads_func")


def reference_model_config(config):
    """A config for the frozen reference model: the policy's, minus the policy's schedule hooks.

    megatron's SequentialMLP deep-copies the config it is built with; after the policy's DDP wrap that config holds
    `no_sync_func = DistributedDataParallel.no_sync`, whose process groups cannot be copied ("cannot pickle
    'torch._C._distributed_c10d.ProcessGroup' object when instantiating TransformerLayer"). The reference model is
    never wrapped in DDP and runs forward only, so it gets a shallow copy without those hooks (process groups are
    shared, not copied).
    """
    import copy

    reference_config = copy.copy(config)
    for name in SCHEDULE_HOOKS:
        if hasattr(reference_config, name):
            setattr(reference_config, name, None)
    return reference_config


def build_training_setup(args) -> TrainingSetup:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.training.arguments import core_transformer_config_from_args

    parallel = initialize_model_parallel(parallel_sizes(args), seed=args.seed,
                                         sequence_parallel=bool(args.sequence_parallel))
    hf_config = args.hf_model_config
    arch = arch_from_hf_config(hf_config)
    config = core_transformer_config_from_args(args)
    vocab_size = padded_vocab_size(arch.vocab_size, args.tensor_model_parallel_size, args.make_vocab_size_divisible_by)
    weights = initial_hf_weights(args, hf_config)
    chunks = build_policy(args, config, arch, vocab_size, weights, parallel)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # a non-finite step is skipped (identically on every rank), not raised
    )
    model = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk) for chunk in chunks
    ]
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            sgd_momentum=args.sgd_momentum,
            clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16, params_dtype=args.params_dtype,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        model,
    )
    samples_per_step = args.grpo_prompts_per_step * args.grpo_group_size
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=(args.lr_warmup_iters or 0) * samples_per_step,
        lr_decay_steps=max(1, args.train_iters * samples_per_step * args.grpo_iterations),
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=max(1, args.train_iters * samples_per_step),
        wd_incr_style="constant",
        # megatron's semantics on resume: scheduler values must match the checkpoint's unless one of these is given
        use_checkpoint_opt_param_scheduler=bool(args.use_checkpoint_opt_param_scheduler),
        override_opt_param_scheduler=bool(args.override_opt_param_scheduler),
    )

    reference = reference_routers = None
    if args.grpo_kl_beta > 0:
        reference = build_policy(args, reference_model_config(config), arch, vocab_size, weights, parallel)
        for chunk in reference:
            chunk.eval()
            chunk.requires_grad_(False)
        reference_routers = ReplayRouters(reference)

    tokenizer, records = build_data(args)
    from megatron_r3.train.data import PromptSampler
    from megatron_r3.train.rewards import get_reward_fn

    sampler = PromptSampler(records, args.grpo_prompts_per_step, args.seed)
    setup = TrainingSetup(
        args=args, config=config, arch=arch, chunks=chunks, model=model, optimizer=optimizer, scheduler=scheduler,
        routers=ReplayRouters(model), vocab_size=arch.vocab_size, tokenizer=tokenizer, sampler=sampler,
        reward_fn=get_reward_fn(args.reward_fn), parallel=parallel, reference=reference,
        reference_routers=reference_routers, eos_token_id=tokenizer.eos_token_id, moe_layers=arch.moe_layers,
    )
    setup.engine_setup = engine_setup(args, hf_config)
    if parallel.is_global_rank_zero:
        setup.engine = build_engine(setup.engine_setup)
    setup.sync_weights_to_engine()
    return setup


def build_data(args):
    """(tokenizer, prompt records) from --task (synthetic, demo tokenizer) or --prompt-data."""
    from transformers import AutoTokenizer

    from megatron_r3.train.data import check_prompt_lengths, load_prompts
    from megatron_r3.train.tasks import build_demo_tokenizer, make_synthetic_dataset

    if args.tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    elif args.task:
        tokenizer = build_demo_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
    if args.task:
        records = make_synthetic_dataset(args.task, args.num_prompts, args.seed)
    else:
        records = load_prompts(args.prompt_data, prompt_key=args.prompt_key, answer_key=args.answer_key)
    records, dropped = check_prompt_lengths(tokenizer, records, args.seq_length - args.max_new_tokens,
                                            skip=args.skip_long_prompts)
    if dropped:
        log.info(f"--skip-long-prompts: dropped {len(dropped)} of {len(records) + len(dropped)} prompts longer than "
                 f"{args.seq_length - args.max_new_tokens} tokens (prompt indices {[i for i, _ in dropped]})")
    return tokenizer, records


def engine_returns_routes(args) -> bool:
    """Whether the rollout engine must send its routes: the run's replay policy (replay/policy.py) replays them, or
    observes them for replay/routing_agreement."""
    replay = config_from_args(ReplayConfig, args)
    policy = replay_policy(replay.router_replay, replay.reference_replay)
    return policy.engine_returns_routes(replay.collect_routing_agreement)


def engine_setup(args, hf_config) -> EngineSetup:
    """The chosen engine's settings from the parsed arguments (the engine itself never sees `args`)."""
    rollout = config_from_args(RolloutConfig, args)
    return EngineSetup(
        config=engine_config(args, rollout.rollout_engine),
        rollout=rollout,
        hf_config=hf_config,
        seed=args.seed,
        max_batch_size=max(1, args.grpo_prompts_per_step * args.grpo_group_size),
        progress=not args.no_progress,
        require_routes=engine_returns_routes(args),
    )


def engine_config(args, name: str):
    """Engine `name`'s config dataclass filled from the parsed arguments (None: it has no flags)."""
    config_class = engine_config_class(name)
    return None if config_class is None else config_from_args(config_class, args)


def check_engine_arguments(args) -> None:
    """Parse-time checks of the chosen engine's flags (its config's `check()`, when it has one; one-line ValueError)."""
    config = engine_config(args, args.rollout_engine)
    if hasattr(config, "check"):
        config.check()


def build_engine(setup: EngineSetup):
    """The registered engine named by `--rollout-engine` (trainer rank 0 only)."""
    return engine_class(setup.rollout.rollout_engine).build(setup)
