"""Every metric name the project logs, with a one-line description: the one registry producers, the iteration line,
help texts and tools read from.

A producer writes `metric_names.REWARD_MEAN`, never the string "reward/mean", so a renamed metric cannot leave a
column that nothing fills. `DESCRIPTIONS` documents each name; names built from a number (per-layer agreement) are
registered as a pattern with `<n>` and produced by their helper. `tests/unit/test_metric_names.py` checks that every
name a short run emits is registered and every registered name is described.
"""

from __future__ import annotations

import re

# ---- rollout and reward ---------------------------------------------------------------------------------------------
REWARD_MEAN = "reward/mean"
REWARD_STD = "reward/std"
ROLLOUT_RESPONSE_LENGTH_MEAN = "rollout/response_length_mean"
ROLLOUT_SAMPLES = "rollout/samples"
ROLLOUT_FAILED_PROMPTS = "rollout/failed_prompts"
ROLLOUT_TRIMMED_PROMPTS = "rollout/trimmed_prompts"
ROLLOUT_HTTP_RETRIES = "rollout/http_retries"
ROLLOUT_DROPPED_SERVERS = "rollout/dropped_servers"
# ---- train/inference mismatch (grpo/mismatch.py MISMATCH_KEYS under "r3/") -----------------------------------------
R3_PREFIX = "r3/"
R3_LOGP_ABS_DIFF = "r3/rollout_train_logp_abs_diff"
R3_LOGP_SQ_DIFF = "r3/rollout_train_logp_sq_diff"
R3_K3_KL = "r3/rollout_train_k3_kl"
R3_EXTREME_FRAC_TAU2 = "r3/rollout_train_extreme_frac_tau2"
R3_EXTREME_FRAC_TAU5 = "r3/rollout_train_extreme_frac_tau5"
R3_TOKEN_MULT_PROB_ERROR = "r3/token_mult_prob_error"
R3_VALID_TOKENS = "r3/rollout_train_valid_tokens"
# ---- router replay --------------------------------------------------------------------------------------------------
ROUTING_AGREEMENT = "replay/routing_agreement"
ROUTING_AGREEMENT_LAYER_PREFIX = "replay/routing_agreement/layer_"
REPLAY_USED_ROUTE_MATCH = "replay/used_route_match"
REPLAY_REPLAYED_TOKENS = "replay/replayed_tokens"
REPLAY_FALLBACK_TOKENS = "replay/fallback_tokens"
REPLAY_FALLBACK_FRACTION = "replay/fallback_fraction"
# ---- policy update --------------------------------------------------------------------------------------------------
TRAIN_PREFIX = "train/"
TRAIN_PPO_KL = "train/ppo_kl"
TRAIN_PPO_KL_FIRST_MINIBATCH = "train/ppo_kl_first_minibatch"
TRAIN_CLIP_FRAC = "train/clip_frac"
TRAIN_CLIP_FRAC_LOW = "train/clip_frac_low"
TRAIN_CLIP_FRAC_HIGH = "train/clip_frac_high"
TRAIN_RATIO_MEAN = "train/ratio_mean"
TRAIN_ENTROPY = "train/entropy"
TRAIN_LOSS = "train/loss"
TRAIN_TIS_WEIGHT_MEAN = "train/tis_weight_mean"
TRAIN_REF_KL = "train/ref_kl"
TRAIN_REF_KL_FIRST_MINIBATCH = "train/ref_kl_first_minibatch"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_LR = "train/lr"
TRAIN_SKIPPED_STEPS = "train/skipped_steps"
# ---- timing and throughput ------------------------------------------------------------------------------------------
TIMING_STEP_S = "timing/step_s"
TIMING_ROLLOUT_S = "timing/rollout_s"
TIMING_SCORING_S = "timing/scoring_s"
TIMING_BATCHING_S = "timing/batching_s"
TIMING_OLD_LOGPROB_S = "timing/old_logprob_s"
TIMING_REFERENCE_S = "timing/reference_s"
TIMING_UPDATE_S = "timing/update_s"
TIMING_WEIGHT_SYNC_S = "timing/weight_sync_s"
TIMING_METRICS_S = "timing/metrics_s"
THROUGHPUT_PREFIX = "throughput/"
THROUGHPUT_TRAIN_PREFIX = "throughput/train_"
THROUGHPUT_TOKENS_PER_S = "throughput/tokens_per_s"
THROUGHPUT_MODEL_TFLOPS = "throughput/model_tflops"
THROUGHPUT_TFLOPS_PER_GPU = "throughput/tflops_per_gpu"
THROUGHPUT_MFU = "throughput/mfu"
THROUGHPUT_TRAIN_TFLOPS_PER_GPU = "throughput/train_tflops_per_gpu"
THROUGHPUT_TRAIN_MFU = "throughput/train_mfu"
# ---- supervised warm-up (train/sft_warmup.py) -----------------------------------------------------------------------
SFT_TARGET_PROB = "sft/target_prob"
EVAL_REWARD_MEAN = "eval/reward_mean"

DESCRIPTIONS = {
    REWARD_MEAN: "mean reward of the step's rollout samples",
    REWARD_STD: "standard deviation of the rewards of the step's rollout samples",
    ROLLOUT_RESPONSE_LENGTH_MEAN: "mean number of generated tokens per sample",
    ROLLOUT_SAMPLES: "rollout samples trained on this step",
    ROLLOUT_FAILED_PROMPTS: "prompts the rollout engine could not serve (--rollout-failure-policy skip)",
    ROLLOUT_TRIMMED_PROMPTS: "served prompts dropped to fill whole mini-batches of --global-batch-size",
    ROLLOUT_HTTP_RETRIES: "SGLang /generate requests retried so far",
    ROLLOUT_DROPPED_SERVERS: "SGLang servers removed as dead so far",
    R3_LOGP_ABS_DIFF: "token mean of |trainer logprob - rollout logprob| (old-logprob pass)",
    R3_LOGP_SQ_DIFF: "token mean of (trainer logprob - rollout logprob)^2",
    R3_K3_KL: "token mean of the k3 estimate of KL(rollout || trainer)",
    R3_EXTREME_FRAC_TAU2: "fraction of tokens whose trainer/rollout probability ratio is outside [1/2, 2]",
    R3_EXTREME_FRAC_TAU5: "fraction of tokens whose trainer/rollout probability ratio is outside [1/5, 5]",
    R3_TOKEN_MULT_PROB_ERROR: "exp(mean |trainer logprob - rollout logprob|): the multiplicative probability error",
    R3_VALID_TOKENS: "response tokens the mismatch metrics average over",
    ROUTING_AGREEMENT: "fraction of routed experts where the trainer's native top-k equals the engine's routes",
    ROUTING_AGREEMENT_LAYER_PREFIX + "<n>": "replay/routing_agreement of MoE layer n (global layer number)",
    REPLAY_USED_ROUTE_MATCH: "fraction of routed experts where the routes the trainer used equal the engine's",
    REPLAY_REPLAYED_TOKENS: "tokens whose routes the updates replayed",
    REPLAY_FALLBACK_TOKENS: "tokens whose bad routes fell back to native routing (--route-fallback native)",
    REPLAY_FALLBACK_FRACTION: "fraction of the engine's route rows that fell back (gate: --max-fallback-fraction)",
    TRAIN_PPO_KL: "token mean of old logprob - current logprob (k1 estimate of KL(old || new)) over the updates",
    TRAIN_PPO_KL_FIRST_MINIBATCH: "train/ppo_kl of the step's first update (gate: --check-step0-kl)",
    TRAIN_CLIP_FRAC: "fraction of tokens whose ratio was clipped",
    TRAIN_CLIP_FRAC_LOW: "fraction of tokens clipped at 1 - --grpo-clamp-eps-lower",
    TRAIN_CLIP_FRAC_HIGH: "fraction of tokens clipped at 1 + --grpo-clamp-eps-upper",
    TRAIN_RATIO_MEAN: "token mean of the importance ratio current / old policy",
    TRAIN_ENTROPY: "token mean of the policy's entropy",
    TRAIN_LOSS: "policy loss per token",
    TRAIN_TIS_WEIGHT_MEAN: "mean truncated importance-sampling weight (rollout correction)",
    TRAIN_REF_KL: "mean k3 KL to the reference model (--grpo-kl-beta > 0)",
    TRAIN_REF_KL_FIRST_MINIBATCH: "train/ref_kl of the step's first update",
    TRAIN_GRAD_NORM: "mean gradient norm of the step's optimizer steps",
    TRAIN_LR: "learning rate after the step",
    TRAIN_SKIPPED_STEPS: "optimizer steps skipped so far for non-finite gradients",
    TIMING_STEP_S: "seconds of the whole step",
    TIMING_ROLLOUT_S: "seconds of generation (the rollout engine's generate call)",
    TIMING_SCORING_S: "seconds from the end of generation to the batch on every rank: route checks, rewards, "
                      "advantages, the share from rank 0",
    TIMING_BATCHING_S: "seconds of packing micro-batches and uploading their routes",
    TIMING_OLD_LOGPROB_S: "seconds of the old-logprob pass",
    TIMING_REFERENCE_S: "seconds of the reference-model pass",
    TIMING_UPDATE_S: "seconds of the policy updates",
    TIMING_WEIGHT_SYNC_S: "seconds of the weight sync to the rollout engine",
    TIMING_METRICS_S: "seconds of reducing the step's metrics over ranks (before logging)",
    THROUGHPUT_TOKENS_PER_S: "rollout tokens per second of step time",
    THROUGHPUT_MODEL_TFLOPS: "model TFLOPs of the trainer's passes this step",
    THROUGHPUT_TFLOPS_PER_GPU: "model TFLOP/s per GPU over the whole step",
    THROUGHPUT_MFU: "throughput/tflops_per_gpu over the GPU's peak (absent when the peak is unknown)",
    THROUGHPUT_TRAIN_TFLOPS_PER_GPU: "model TFLOP/s per GPU over the trainer's own passes",
    THROUGHPUT_TRAIN_MFU: "throughput/train_tflops_per_gpu over the GPU's peak",
    SFT_TARGET_PROB: "supervised warm-up: mean probability of the target tokens",
    EVAL_REWARD_MEAN: "supervised warm-up: mean reward of greedy samples every --eval-interval steps",
}

_PATTERNS = tuple(re.compile(re.escape(name).replace(re.escape("<n>"), r"\d+") + "$")
                  for name in DESCRIPTIONS if "<n>" in name)


def routing_agreement_layer(layer: int) -> str:
    """``replay/routing_agreement/layer_{layer}`` (global MoE layer number, as in the routes)."""
    return f"{ROUTING_AGREEMENT_LAYER_PREFIX}{int(layer)}"


def mismatch(name: str) -> str:
    """Logged name of a `grpo.mismatch.rollout_train_mismatch` key: ``rollout_train_k3_kl`` -> ``r3/...``."""
    return f"{R3_PREFIX}{name}"


def is_registered(name: str) -> bool:
    return name in DESCRIPTIONS or any(pattern.match(name) for pattern in _PATTERNS)


def describe(name: str) -> str:
    """The one-line description of `name` (KeyError for an unregistered name)."""
    if name in DESCRIPTIONS:
        return DESCRIPTIONS[name]
    for key in DESCRIPTIONS:
        if "<n>" in key and re.fullmatch(re.escape(key).replace(re.escape("<n>"), r"\d+"), name):
            return DESCRIPTIONS[key]
    raise KeyError(f"{name!r} is not a registered metric name (megatron_r3/platform/metric_names.py)")
