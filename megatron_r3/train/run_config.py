"""The trainer's own settings (prompts and reward, run directory and console, in-training gates) as typed configs.

Each field's default is the only place that default is written, its docstring is the flag's `--help`, and
`train/arguments.py` generates the flags from these classes (`platform/typed_config.add_config_arguments`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_r3.replay.config import ReplayConfig
from megatron_r3.model.hf_load_config import HFLoadConfig


@dataclass
class TaskConfig:
    """Prompts, tokenizer and reward."""

    task: Optional[str] = None
    """Built-in synthetic verifiable task (e.g. copy_first, add_mod10) instead of --prompt-data."""
    num_prompts: int = 4096
    """Prompts generated for a synthetic --task."""
    prompt_data: Optional[str] = None
    """JSONL or parquet file with prompts/answers."""
    prompt_key: str = "prompt"
    """Field of a --prompt-data record that holds the prompt."""
    answer_key: str = "answer"
    """Field of a --prompt-data record that holds the reference answer."""
    reward_fn: str = "exact_match"
    """Built-in reward name or 'package.module:function'."""
    tokenizer_dir: Optional[str] = None
    """Tokenizer directory (default: --hf-checkpoint; the built-in demo tokenizer for --task)."""
    skip_long_prompts: bool = False
    """Drop prompts too long for --seq-length minus --max-new-tokens (counted and reported) instead of refusing to
    start."""


@dataclass
class RunConfig:
    """Run directory, console, precision and micro-batching of the trainer."""

    run_dir: Optional[str] = None
    """Outputs (metrics.jsonl, TensorBoard, config.yaml, checkpoints); default runs/<time>."""
    overwrite_run_dir: bool = False
    """Allow a new run (no checkpoint to resume) to overwrite an existing metrics.jsonl."""
    no_progress: bool = False
    """No progress bar during rollout."""
    verbose: bool = False
    """Keep megatron-core's INFO logging and megatron_r3's per-rank messages on the console."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s per GPU for throughput/mfu (default: the bf16 data-sheet figure of the GPU,
    model/flops.py; no MFU on the CPU)."""
    trainer_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 with fp32 master weights and grouped-GEMM experts on a GPU (unless --fp16/--bf16 is given), fp32
    on the CPU."""
    max_tokens_per_microbatch: Optional[int] = None
    """Pack samples (THD) into microbatches of at most this many tokens instead of --micro-batch-size padded rows
    (BSHD)."""


@dataclass
class GateConfig:
    """In-training gates: the run fails with a message naming the metric when one trips."""

    check_step0_kl: Optional[float] = None
    """Fail if train/ppo_kl of the first update exceeds this bound."""
    max_rollout_train_logp_abs_diff: Optional[float] = None
    """Fail if r3/rollout_train_logp_abs_diff exceeds this bound at any step."""


TRAINER_CONFIGS = ((ReplayConfig, "megatron_r3 router replay"),
                   (TaskConfig, "megatron_r3: prompts and reward"), (RunConfig, "megatron_r3: run"),
                   (GateConfig, "megatron_r3: gates"), (HFLoadConfig, "megatron_r3: HF checkpoint load"))
"""The trainer's config classes and their --help group titles, in the order `add_grpo_arguments` adds them."""
