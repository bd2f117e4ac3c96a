"""Supervised warm-up: teach a randomly initialised MoE a synthetic task by teacher forcing, so that GRPO starts
from a policy with real structure (the R3 paper's instability needs a trained policy; a random one never gets there).

    python -m megatron_r3.train.sft_warmup --config examples/r3_stability/warmup_cpu.yaml --run-dir runs/warmup

Same command line, YAML and outputs as `pretrain_grpo.py` (megatron's flags; `--task`, `--hf-config`, `--lr`,
`--train-iters`, `--save-interval`, `--eval-interval` ...). Each step takes `--grpo-prompts-per-step` prompts of the
task (`--grpo-group-size 1`), builds `prompt + answer + <eos>` and minimises the token-mean cross-entropy of the
answer tokens. Everything below the loss is the GRPO trainer's: `GRPOTrainer` builds the policy, megatron optimizer,
LR schedule and prompt sampler (`components.build_training_setup`); samples become microbatches through the same
`plan_step`; the pass runs through the same `run_schedule` wrapper around megatron's forward-backward function
(no replay: native routing); the optimizer step, checkpoints (`--save`, automatic resume) and `metrics.jsonl` are
the trainer's. Every `--eval-interval` steps (and after the last) the embedded rollout engine samples the step's
prompts with the run's sampling settings and logs `eval/reward_mean`: the reward GRPO would start from.
Two early stops (each evaluated, saved and exported as at a last step): megatron's `--exit-duration-in-mins`, so
that a time-boxed experiment keeps time for the GRPO runs, and this module's own `--stop-at-eval-reward R` (given on
the command line, before megatron's flags are parsed): stop once `eval/reward_mean` reaches R, so that GRPO starts
from a *partially* competent policy whatever the hardware's speed.

At the end the policy is written as a Hugging Face directory `RUN_DIR/hf` (safetensors + config.json), which
`pretrain_grpo.py --hf-checkpoint RUN_DIR/hf` starts from (fresh optimizer, step 0, its own seeds).

Logged per step: `train/loss` (answer-token cross-entropy, nats), `sft/target_prob` (mean probability of the
answer token), `train/grad_norm`, `train/lr`, `timing/step_s`; at evaluations `eval/reward_mean`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_r3.grpo.losses import masked_sum
from megatron_r3.grpo.mismatch import MetricAccumulator
from megatron_r3.platform import collectives
from megatron_r3.platform import metric_names
from megatron_r3.platform.distributed import device
from megatron_r3.platform.logging import get_logger
from megatron_r3.replay.policy import replay_policy
from megatron_r3.train.microbatching import TrainSample
from megatron_r3.train.passes import PassContext, declare_metrics, run_custom_pass
from megatron_r3.train.trainer import GRPOTrainer, _host_reduce

HF_EXPORT_DIR = "hf"
SFT_METRICS = (metric_names.TRAIN_LOSS, metric_names.SFT_TARGET_PROB)

log = get_logger(__name__)


def teacher_samples(prompt_ids: list[list[int]], answers: list[list[int]], eos_token_id: int) -> list[TrainSample]:
    """`prompt + answer + <eos>` per record as trainer samples: the loss mask covers the answer and the `<eos>`."""
    out = []
    for index, (prompt, answer) in enumerate(zip(prompt_ids, answers)):
        response = list(answer) + [eos_token_id]
        out.append(
            TrainSample(
                index=index,
                tokens=torch.tensor(list(prompt) + response, dtype=torch.long),
                prompt_length=len(prompt),
                rollout_logprobs=torch.zeros(len(response)),
                reward=0.0,
                advantage=1.0,
            )
        )
    return out


class SFTWarmup(GRPOTrainer):
    """The GRPO trainer's setup, checkpoints and logging with a supervised step in place of the GRPO step."""

    def __init__(self, args, stop_at_eval_reward: Optional[float] = None):
        self.stop_at_eval_reward = stop_at_eval_reward
        if args.grpo_group_size != 1:
            raise ValueError(
                f"sft_warmup: --grpo-group-size must be 1 (one teacher sequence per prompt), got {args.grpo_group_size}"
            )
        if args.grpo_iterations != 1:
            raise ValueError(f"sft_warmup: --grpo-iterations must be 1, got {args.grpo_iterations}")
        if not replay_policy(args.router_replay, args.reference_replay).all_native:
            raise ValueError("sft_warmup: --router-replay must be off (the warm-up routes natively)")
        if args.task is None:
            raise ValueError("sft_warmup: give a built-in --task (its records carry the answers to teach)")
        super().__init__(args)
        if self.setup.eos_token_id is None:
            raise ValueError("sft_warmup: the tokenizer has no EOS token to end the teacher responses with")

    def train(self) -> list[dict]:
        """The trainer's loop (checkpoints every --save-interval) with the two early stops of the module docstring;
        the HF export follows however it ends."""
        args = self.args
        start = time.time()
        history = []
        try:
            while self.step < args.train_iters:
                out_of_time = self._out_of_time(start)
                last = out_of_time or self.step + 1 == args.train_iters
                metrics = self.train_step(evaluate=last or bool(
                    args.eval_interval and (self.step + 1) % args.eval_interval == 0))
                history.append(metrics)
                self.step += 1
                reached = self.stop_at_eval_reward is not None and (
                    metrics.get(metric_names.EVAL_REWARD_MEAN, -math.inf) >= self.stop_at_eval_reward)
                if out_of_time or reached or (args.save_interval and self.step % args.save_interval == 0):
                    self.save()
                if out_of_time or reached:
                    if self.is_logger:
                        why = (f"--exit-duration-in-mins {args.exit_duration_in_mins} reached" if out_of_time else
                               f"eval/reward_mean {metrics['eval/reward_mean']:.4f} >= --stop-at-eval-reward "
                               f"{self.stop_at_eval_reward}")
                        log.info(f"sft_warmup: stopped after {self.step} steps: {why}")
                    break
        finally:
            self.logger.close()
            self.setup.close()
        save_hf_export(self)
        return history

    def _out_of_time(self, start: float) -> bool:
        limit = self.args.exit_duration_in_mins
        if not limit:
            return False
        flag = torch.tensor([1.0 if (time.time() - start) / 60.0 > limit else 0.0])
        if dist.is_initialized():
            collectives.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.parallel.host_group)
        return bool(flag[0] > 0)

    def train_step(self, evaluate: bool = False) -> dict:
        args, setup = self.args, self.setup
        start = time.perf_counter()
        records = setup.sampler.batch(self.step)
        prompt_ids = setup.tokenize(records)
        answers = [setup.tokenizer(r.answer, add_special_tokens=False)["input_ids"] for r in records]
        samples = teacher_samples(prompt_ids, answers, setup.eos_token_id)
        plan = self._plan(samples)
        metrics = MetricAccumulator()
        declare_metrics(metrics, SFT_METRICS, mismatch=False)
        ctx = PassContext(chunks=setup.model, routers=setup.routers, temperature=1.0, vocab_size=setup.vocab_size,
                          seq_length=plan.seq_length, micro_batch_size=args.micro_batch_size, device=device(),
                          parallel=self.parallel)

        def loss_of(mb, inputs, logits):
            logp = ctx.logprobs(logits, inputs.labels)
            mask = inputs.loss_mask
            loss_sum = -masked_sum(logp, mask)
            if ctx.computes_loss:
                count = mask.sum()
                metrics.add_sums(metric_names.TRAIN_LOSS, loss_sum.detach(), count)
                metrics.add_sums(metric_names.SFT_TARGET_PROB, masked_sum(logp.detach().exp(), mask), count)
            return loss_sum, mask.sum().to(torch.int), {"loss": loss_sum.detach()}

        grad_norms = []
        for minibatch in plan.minibatches:
            setup.zero_grad()
            run_custom_pass(ctx, minibatch, loss_of, forward_only=False)
            grad_norms.append(self._optimizer_step())
        metrics.all_reduce(self.parallel.host_group if _host_reduce() else None)
        out = metrics.means()
        finite = [g for g in grad_norms if math.isfinite(g)]
        out[metric_names.TRAIN_GRAD_NORM] = sum(finite) / len(finite) if finite else float("nan")
        out[metric_names.TRAIN_SKIPPED_STEPS] = float(self.skipped_steps)
        out[metric_names.TRAIN_LR] = float(setup.optimizer.param_groups[0]["lr"])
        if evaluate:
            setup.sync_weights_to_engine()
            payload = self._rollout()
            out[metric_names.EVAL_REWARD_MEAN] = float(payload.metrics.get(metric_names.REWARD_MEAN, float("nan")))
        out[metric_names.TIMING_STEP_S] = time.perf_counter() - start
        self.logger.log(self.step, out)
        if self.is_logger and (self.step % max(1, args.log_interval) == 0 or metric_names.EVAL_REWARD_MEAN in out):
            line = (f" sft step {self.step + 1:5d}/{args.train_iters} | loss {out['train/loss']:.4f} | "
                    f"target prob {out['sft/target_prob']:.4f} | grad norm {out['train/grad_norm']:.3f} | "
                    f"lr {out['train/lr']:.2e} | {out['timing/step_s']:.3f} s")
            if metric_names.EVAL_REWARD_MEAN in out:
                line += f" | eval reward {out['eval/reward_mean']:.4f}"
            log.info(line)
        return out


def save_hf_export(trainer: GRPOTrainer) -> str:
    """The policy as a HF directory under RUN_DIR (every rank joins the gather; rank 0 writes)."""
    from megatron_r3.model.weights import save_hf_checkpoint

    setup = trainer.setup
    directory = os.path.join(trainer.args.run_dir, HF_EXPORT_DIR)
    save_hf_checkpoint(setup.chunks, setup.arch, trainer.args.hf_model_config, directory, setup.parallel)
    if trainer.is_logger:
        log.info(f"sft_warmup: wrote the warmed-up policy to {directory} (start GRPO with --hf-checkpoint "
                 f"{directory})")
    return directory


def main(argv=None) -> list[dict]:
    from megatron_r3.platform.distributed import initialize_torch_distributed
    from megatron_r3.train.arguments import parse_grpo_args, save_resolved_config
    from megatron_r3.train.megatron_flag_policy import SFT_WARMUP_READS

    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--stop-at-eval-reward", type=float, default=None,
                     help="stop once eval/reward_mean (every --eval-interval steps) reaches this value")
    mine, rest = own.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    args = parse_grpo_args(rest, min_group_size=1, extra_honoured=SFT_WARMUP_READS)
    initialize_torch_distributed()
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        save_resolved_config(args, os.path.join(args.run_dir, "config.yaml"), SFT_WARMUP_READS)
    return SFTWarmup(args, stop_at_eval_reward=mine.stop_at_eval_reward).train()


if __name__ == "__main__":
    main()
