"""The GRPO engine: rollout -> old logprobs -> (reference logprobs) -> mini-batch updates -> weight sync, per step.

Which routes each pass uses is data (`replay/policy.py`, the README's "which pass replays what" table): the trainer
looks up its `ReplayPolicy` once and drives every pass from it, with no branch on `--router-replay`.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist

from megatron_r3.grpo.losses import PolicyLossConfig
from megatron_r3.grpo.mismatch import MetricAccumulator
from megatron_r3.replay.config_checks import check_replay_config, replay_bypass_reasons
from megatron_r3.model.flops import grpo_throughput_metrics, peak_tflops, shape_from_config
from megatron_r3.platform import collectives
from megatron_r3.platform import metric_names
from megatron_r3.platform.distributed import device
from megatron_r3.platform.logging import get_logger
from megatron_r3.platform.typed_config import config_from_args
from megatron_r3.replay.config import ReplayConfig
from megatron_r3.replay.layout import sequence_pad_multiple
from megatron_r3.replay.microbatch import routes_from_recorded
from megatron_r3.replay.policy import Action, PassRouting, Source, replay_policy
from megatron_r3.replay.router import COUNTERS
from megatron_r3.train import checkpoint as ckpt
from megatron_r3.train.checkpoint_integrity import check_resume_source
from megatron_r3.train.metrics_log import MetricsLogger, WandbConfig, format_iteration_line
from megatron_r3.train.microbatching import StepPlan, microbatch_counts, plan_step
from megatron_r3.train.passes import PassContext, declare_metrics, logprob_pass, step_metric_names, update_pass
from megatron_r3.train.rollout_phase import RolloutPayload, RouteShare, generate_batch, share_from_rank0
from megatron_r3.train.components import TrainingSetup, build_training_setup

log = get_logger(__name__)


class GateError(RuntimeError):
    """A run tripped one of its in-training gates (--check-step0-kl, --max-rollout-train-logp-abs-diff)."""


class GRPOTrainer:
    def __init__(self, args):
        self.args = args
        # before anything is built: what to resume from, refusing to overwrite an earlier run's outputs silently
        self.resume_root = check_resume_source(args.load, args.save, args.run_dir,
                                               overwrite=args.overwrite_run_dir)
        if not args.verbose:  # megatron logs every parameter at INFO while building DDP
            logging.getLogger("megatron").setLevel(logging.WARNING)
        self.setup: TrainingSetup = build_training_setup(args)
        self.replay = config_from_args(ReplayConfig, args)
        check_replay_config(self.setup.config, self.replay.router_replay)
        self.policy = replay_policy(self.replay.router_replay, self.replay.reference_replay)
        # off mode runs what replay cannot hook (e.g. sinkhorn balancing); it then measures no routing agreement
        self.can_observe_routes = not replay_bypass_reasons(self.setup.config)
        self.parallel = parallel = self.setup.parallel
        self.pad_multiple = sequence_pad_multiple(parallel.tp_size, parallel.cp_size, parallel.sequence_parallel)
        self.loss_config = PolicyLossConfig(
            clip_ratio_low=args.grpo_clamp_eps_lower,
            clip_ratio_high=args.grpo_clamp_eps_upper,
            tis_cap=args.rl_importance_sampling_truncation_coef if args.rl_inference_logprobs_is_correction else None,
            kl_coef=args.grpo_kl_beta,
        )
        self.is_logger = parallel.is_global_rank_zero
        self._peak_tflops = peak_tflops(torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                        args.peak_tflops)
        self._flops_shape = shape_from_config(
            self.setup.config, getattr(args, "padded_vocab_size", None) or args.hf_model_config.vocab_size)
        # the layers every global rank replays (its routers'); with its data-parallel rank (`parallel.peer(r)`) that
        # is what rank 0 ships each rank of a step's routes
        self._route_shares = None
        if parallel.world_size > 1:
            self._route_shares = [None] * parallel.world_size
            mine = RouteShare(tuple(self.setup.routers.layer_numbers))
            dist.all_gather_object(self._route_shares, mine, group=parallel.host_group)
        self.step = 0
        self.skipped_steps = 0
        if self.resume_root is not None:
            self._resume()
        self.logger = MetricsLogger(args.run_dir, enabled=self.is_logger, resume_step=self.step,
                                    tensorboard_dir=args.tensorboard_dir, wandb=WandbConfig.from_args(args))

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        root = self.resume_root
        step = ckpt.latest_step(root)
        if step is None:
            raise FileNotFoundError(f"--load {root}: no checkpoint (no '{ckpt.TRACKER}' tracker file)")
        state = ckpt.load_checkpoint(root, step, self.setup.chunks, self.setup.optimizer, self.parallel,
                                     load_optimizer=not self.args.no_load_optim, load_rng=not self.args.no_load_rng)
        try:
            self.setup.scheduler.load_state_dict(state["scheduler"])
        except AssertionError as error:  # megatron's check that the schedule matches the checkpoint's
            raise ValueError(
                f"--load {root}: {error}. Pass --override-opt_param-scheduler to use this run's schedule, or "
                f"--use-checkpoint-opt_param-scheduler to keep the checkpoint's"
            ) from None
        self.setup.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.setup.sync_weights_to_engine()  # the engine must sample from the restored policy

    def save(self) -> None:
        state = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "scheduler": self.setup.scheduler.state_dict(),
            "sampler": self.setup.sampler.state_dict(),
            "router_replay": self.replay.router_replay,
        }
        ckpt.save_checkpoint(self.args.save, self.step, self.setup.chunks, self.setup.optimizer, state, self.parallel)

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict]:
        history = []
        try:
            while self.step < self.args.train_iters:
                metrics = self.train_step()
                history.append(metrics)
                self.step += 1
                if self.args.save_interval and self.step % self.args.save_interval == 0:
                    self.save()
        finally:
            self.logger.close()
            self.setup.close()
        return history

    def train_step(self) -> dict:
        args, setup = self.args, self.setup
        step_start = time.perf_counter()
        payload = self._rollout()
        samples = payload.samples
        rollout_s = payload.metrics.get(metric_names.TIMING_ROLLOUT_S, 0.0)
        timings = {metric_names.TIMING_ROLLOUT_S: rollout_s,
                   metric_names.TIMING_SCORING_S: time.perf_counter() - step_start - rollout_s}

        start = time.perf_counter()
        plan = self._plan(samples)
        metrics = MetricAccumulator()
        declare_metrics(metrics, step_metric_names(tis=self.loss_config.tis_cap is not None,
                                                   reference=self.loss_config.kl_coef > 0), mismatch=True)
        setup.routers.statistics(reset=True)
        microbatches = plan.microbatches
        for mb in microbatches:  # one asynchronous copy per microbatch, reused by every pass of the step
            if mb.routes is not None:
                mb.routes = mb.routes.pin_memory().to(device(), non_blocking=True)
        rollout_routes = [mb.routes for mb in microbatches] if microbatches[0].routes is not None else None
        timings[metric_names.TIMING_BATCHING_S] = time.perf_counter() - start

        # old logprobs (and the mismatch metrics)
        start = time.perf_counter()
        ctx = self._context(setup.model, setup.routers, plan)
        action, routes = self._pass_routes(self.policy.old_logprob, microbatches, rollout_routes)
        old = logprob_pass(ctx, microbatches, target="old", action=action, routes=routes, metrics=metrics,
                           collect_agreement=self.replay.collect_routing_agreement)
        if self.policy.old_logprob.action is Action.RECORD:  # what the updates (R2) replay
            for mb, recorded in zip(microbatches, old.recorded):
                valid = mb.layout.valid[mb.token_slots]
                mb.recorded = routes_from_recorded(recorded, valid.to(device()), int(valid.sum()))
        replay_stats = setup.routers.statistics(reset=True)
        timings[metric_names.TIMING_OLD_LOGPROB_S] = time.perf_counter() - start

        # reference logprobs for the KL term
        if self.loss_config.kl_coef > 0:
            start = time.perf_counter()
            ref_ctx = self._context(setup.reference, setup.reference_routers, plan)
            action, routes = self._pass_routes(self.policy.reference, microbatches, rollout_routes)
            logprob_pass(ref_ctx, microbatches, target="ref", action=action, routes=routes, metrics=metrics)
            setup.reference_routers.statistics(reset=True)
            timings[metric_names.TIMING_REFERENCE_S] = time.perf_counter() - start

        # mini-batch updates; the first one sees the weights the old logprobs were computed with, so its ppo_kl is
        # ~0 unless the two passes route (or compute) differently: that is what --check-step0-kl guards
        start = time.perf_counter()
        grad_norms = []
        replayed_tokens = 0  # tokens whose routes the updates replayed (each microbatch once)
        first = MetricAccumulator()
        declare_metrics(first, step_metric_names(tis=self.loss_config.tis_cap is not None,
                                                 reference=self.loss_config.kl_coef > 0), mismatch=False)
        for iteration in range(args.grpo_iterations):
            for index, minibatch in enumerate(plan.minibatches):
                action, routes = self._pass_routes(self.policy.update, minibatch,
                                                   [mb.routes for mb in minibatch] if rollout_routes else None)
                setup.zero_grad()
                result = update_pass(
                    ctx, minibatch, loss_config=self.loss_config, action=action, routes=routes,
                    metrics=(metrics, first) if iteration == index == 0 else (metrics,),
                    entropy_weight=args.grpo_entropy_term_weight,
                    use_rollout_logprobs=self.loss_config.tis_cap is not None,
                    use_reference=self.loss_config.kl_coef > 0,
                )
                if iteration == 0:
                    replayed_tokens += result.replayed_tokens
                grad_norms.append(self._optimizer_step())
        setup.routers.statistics(reset=True)
        timings[metric_names.TIMING_UPDATE_S] = time.perf_counter() - start

        start = time.perf_counter()
        setup.sync_weights_to_engine()
        timings[metric_names.TIMING_WEIGHT_SYNC_S] = time.perf_counter() - start

        start = time.perf_counter()
        step_metrics = self._reduce_metrics(metrics, first, replay_stats, payload, grad_norms, replayed_tokens)
        timings[metric_names.TIMING_METRICS_S] = time.perf_counter() - start
        step_metrics.update(timings)
        step_metrics[metric_names.TIMING_STEP_S] = time.perf_counter() - step_start
        tokens = sum(int(s.tokens.shape[0]) for s in samples)
        step_metrics[metric_names.THROUGHPUT_TOKENS_PER_S] = tokens / step_metrics[metric_names.TIMING_STEP_S]
        step_metrics.update(grpo_throughput_metrics(  # model FLOPs, TFLOP/s per GPU and MFU (model/flops.py)
            self._flops_shape, [int(s.tokens.shape[0]) for s in samples], step_metrics,
            world_size=args.world_size, grpo_iterations=args.grpo_iterations,
            reference_pass=self.loss_config.kl_coef > 0, peak=self._peak_tflops))
        self._check_gates(step_metrics)
        self.logger.log(self.step, step_metrics)
        if self.is_logger and self.step % max(1, args.log_interval) == 0:
            log.info(format_iteration_line(self.step, args.train_iters, step_metrics,
                                           step_metrics[metric_names.TIMING_STEP_S]))
        return step_metrics

    # ------------------------------------------------------------------ pieces
    def _rollout(self) -> RolloutPayload:
        setup = self.setup
        payload = None
        if setup.engine is not None:
            records = setup.sampler.batch(self.step)
            prompt_ids = setup.tokenize(records)
            payload = generate_batch(setup.engine, prompt_ids, records, setup.tokenizer, setup.reward_fn,
                                     setup.rollout_settings(self.step))
        return share_from_rank0(payload, self.parallel, self._route_shares, self.args.global_batch_size)

    def _plan(self, samples) -> StepPlan:
        args, setup = self.args, self.setup
        equal = self.parallel.is_pipelined
        common = dict(global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
                      max_tokens_per_microbatch=args.max_tokens_per_microbatch, pad_multiple=self.pad_multiple)
        targets = None
        if args.max_tokens_per_microbatch:
            counts = torch.tensor(microbatch_counts(samples, self.parallel, **common), dtype=torch.int64)
            if dist.is_initialized():  # every rank of an expert-parallel (data-parallel) group runs as many
                collectives.all_reduce(counts, op=dist.ReduceOp.MAX, group=self.parallel.host_group)
            targets = counts.tolist()
        with_routes = any(sample.routes is not None for sample in samples)  # only this rank's share has them
        return plan_step(samples, self.parallel, equal_seq_length=equal, moe_layer_numbers=setup.routers.layer_numbers,
                         num_experts=setup.config.num_moe_experts, with_routes=with_routes,
                         min_microbatches=targets, **common)

    def _context(self, chunks, routers, plan: StepPlan) -> PassContext:
        return PassContext(
            chunks=chunks, routers=routers, temperature=self._temperature(), vocab_size=self.setup.vocab_size,
            seq_length=plan.seq_length, micro_batch_size=plan.micro_batch_size, device=device(),
            parallel=self.parallel,
        )

    def _temperature(self) -> float:
        return self.args.rl_default_temperature if self.args.rl_default_temperature > 0 else 1.0

    def _pass_routes(self, routing: PassRouting, microbatches, rollout_routes):
        """(router action, routes) of one pass over `microbatches`, as the replay policy gives them."""
        if routing.source is Source.ROLLOUT:
            routes = rollout_routes
        elif routing.source is Source.RECORDED:
            routes = [mb.recorded for mb in microbatches]
        else:
            routes = None
        if routing.observes:
            # the router chooses outside the hooked top-k (sinkhorn, ... under off): there is nothing to observe
            routes = _observed(routes) if self.can_observe_routes else None
        return routing.router_action(have_routes=routes is not None), routes

    def _optimizer_step(self) -> float:
        """Finalised grads -> global grad norm -> step; a non-finite norm skips the step on every rank alike (the
        norm is reduced over the model-parallel groups of already data-parallel-reduced grads, so all ranks see the
        same value and take the same branch)."""
        optimizer = self.setup.optimizer
        if optimizer.prepare_grads():  # megatron found inf/nan while preparing (mixed precision)
            self.skipped_steps += 1
            self.setup.zero_grad()
            return float("nan")
        grad_norm = float(optimizer.get_grad_norm())
        if not math.isfinite(grad_norm):
            self.skipped_steps += 1
            self.setup.zero_grad()
            return float("nan")
        success, _, _ = optimizer.step()
        if not success:
            self.skipped_steps += 1
            return float("nan")
        self.setup.scheduler.step(increment=self.args.global_batch_size)
        return grad_norm

    def _reduce_metrics(self, metrics: MetricAccumulator, first: MetricAccumulator, replay_stats, payload,
                        grad_norms, replayed_tokens) -> dict:
        group = self.parallel.host_group if _host_reduce() else None
        metrics.all_reduce(group)
        first.all_reduce(group)
        first_means = first.means()
        out = {key if "/" in key else metric_names.mismatch(key): value for key, value in metrics.means().items()}
        out[metric_names.TRAIN_PPO_KL_FIRST_MINIBATCH] = first_means.get(metric_names.TRAIN_PPO_KL, float("nan"))
        # 0 at step 0 when the reference pass routed as the old-logprob pass
        if metric_names.TRAIN_REF_KL in first_means:
            out[metric_names.TRAIN_REF_KL_FIRST_MINIBATCH] = first_means[metric_names.TRAIN_REF_KL]
        out.update(payload.metrics)
        out.update(self._replay_metrics(replay_stats, replayed_tokens))
        finite = [g for g in grad_norms if math.isfinite(g)]
        out[metric_names.TRAIN_GRAD_NORM] = sum(finite) / len(finite) if finite else float("nan")
        out[metric_names.TRAIN_SKIPPED_STEPS] = float(self.skipped_steps)
        out[metric_names.TRAIN_LR] = float(self.setup.optimizer.param_groups[0]["lr"])
        return out

    def _replay_metrics(self, stats, replayed_tokens: int) -> dict:
        """Per-layer and overall agreement from the old-logprob pass, summed over ranks that see distinct tokens."""
        layers = self.setup.config.num_layers
        counters = torch.zeros(layers, 4, dtype=torch.float64)
        # ranks that see distinct tokens: SP splits them over TP, CP and DP always do; PP stages share them
        counts_tokens = self.parallel.owns_distinct_tokens
        if counts_tokens:
            for number, per_layer in stats.layer_counters.items():
                counters[number - 1] = torch.stack(
                    [per_layer[name].double().cpu() for name in COUNTERS]
                )
        first_stage = self.parallel.is_first_pipeline_stage()
        tokens = torch.tensor([float(replayed_tokens if counts_tokens and first_stage else 0)], dtype=torch.float64)
        flat = torch.cat([counters.reshape(-1), tokens])
        if dist.is_initialized():
            collectives.all_reduce(flat, group=self.parallel.host_group)
        counters, tokens = flat[:-1].view(layers, 4), float(flat[-1])
        out = {metric_names.REPLAY_REPLAYED_TOKENS: tokens}
        moe = counters[:, 0] > 0
        if moe.any():
            valid, compared, agree, match = counters[moe].sum(dim=0).tolist()
            out[metric_names.ROUTING_AGREEMENT] = agree / compared if compared else float("nan")
            out[metric_names.REPLAY_USED_ROUTE_MATCH] = match / valid if valid else float("nan")
            for index in torch.nonzero(moe).flatten().tolist():
                _, c, a, _ = counters[index].tolist()
                out[metric_names.routing_agreement_layer(index + 1)] = a / c if c else float("nan")
        return out

    def _check_gates(self, metrics: dict) -> None:
        args = self.args
        # only when a pass replays the engine's routes (R3): otherwise they are merely observed (routing_agreement)
        replays_engine_routes = self.policy.replays_rollout_routes
        fraction = metrics.get(metric_names.REPLAY_FALLBACK_FRACTION, 0.0)
        replay = self.replay
        if replays_engine_routes and replay.max_fallback_fraction is not None and \
                fraction > replay.max_fallback_fraction:
            raise GateError(
                f"--max-fallback-fraction: {fraction:.1%} of the route rows at step {self.step} "
                f"({int(metrics.get('replay/fallback_tokens', 0))} tokens) fell back to native routing, above the "
                f"bound {replay.max_fallback_fraction:.1%}: the engine's routes are unusable, so --router-replay "
                f"{replay.router_replay} is effectively off"
            )
        agreement = metrics.get(metric_names.ROUTING_AGREEMENT)
        bound = replay.min_routing_agreement
        if replays_engine_routes and bound and agreement is not None and not (agreement >= bound):
            raise GateError(
                f"--min-routing-agreement: replay/routing_agreement is {agreement:.4f} at step {self.step}, below "
                f"the bound {bound:.4f}: the trainer's own top-k rarely picks the replayed experts, so the routes "
                f"likely belong to other tokens (shifted or mismatched rows) or another model"
            )
        if self.step == 0 and args.check_step0_kl is not None:
            kl = metrics.get(metric_names.TRAIN_PPO_KL_FIRST_MINIBATCH, float("nan"))
            if not (abs(kl) <= args.check_step0_kl):
                raise GateError(
                    f"--check-step0-kl: train/ppo_kl of the first update at step 0 is {kl:.3e}, above the bound "
                    f"{args.check_step0_kl:.3e}: the old-logprob and update passes disagree on the same weights "
                    f"(--router-replay {replay.router_replay})"
                )
        bound = args.max_rollout_train_logp_abs_diff
        if bound is not None:
            diff = metrics.get(metric_names.R3_LOGP_ABS_DIFF, float("nan"))
            if not (diff <= bound):
                raise GateError(
                    f"--max-rollout-train-logp-abs-diff: r3/rollout_train_logp_abs_diff is {diff:.3e} at step "
                    f"{self.step}, above the bound {bound:.3e}"
                )


def _observed(routes):
    return None if routes is None else [r.observed() for r in routes]


def _host_reduce() -> bool:
    """Metric sums live on the CPU here, so they are reduced over the gloo host group; on GPU over the default.
    The strict collective-device test mode (platform/collectives.py) takes the GPU path, which is what it checks."""
    return not torch.cuda.is_available() and not collectives.strict_mode()


def main(args) -> list[dict]:
    trainer = GRPOTrainer(args)
    return trainer.train()
