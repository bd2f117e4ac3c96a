"""`pretrain_grpo.py`'s command line: Megatron's own parser, plus the GRPO / replay flags, plus YAML configs.

Megatron flags keep Megatron's names and meaning (`--tensor-model-parallel-size`, `--recompute-granularity`,
`--grpo-group-size`, `--grpo-clamp-eps-lower`, ...). The model architecture comes from a Hugging Face Qwen3-MoE
config (`--hf-checkpoint DIR` or `--hf-config FILE|DIR`) and is written into Megatron's network-size arguments,
so `validate_args` and `core_transformer_config_from_args` see one consistent model.

Precedence: Megatron/our defaults < `--config FILE.yaml` (keys are the flag names with `_`) < command line.
Every YAML value goes through its flag's argparse type and choices, as on the command line (`yaml_value`), and is
read with YAML 1.2 booleans: `reference_replay: off` is the string 'off', only true/false are booleans.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from typing import Optional, Sequence

import yaml

from megatron_r3.platform.python_compat import apply_python_compat
from megatron_r3.platform.typed_config import add_config_arguments
from megatron_r3.rollout.engines import add_rollout_arguments
from megatron_r3.train.run_config import TRAINER_CONFIGS

# Megatron defaults we change for RL, stated once (all still overridable by YAML / CLI); the policy-loss ones are
# PolicyLossConfig's defaults (`rl_overrides`).
GRPO_DEFAULTS = dict(
    grpo_kl_beta=0.0,
    grpo_iterations=1,
    rl_default_temperature=1.0,
    rl_default_top_p=1.0,
    lr=1e-5,
    min_lr=0.0,
    lr_decay_style="constant",
    weight_decay=0.0,
    clip_grad=1.0,
    micro_batch_size=1,
    make_vocab_size_divisible_by=1,
    log_interval=1,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    moe_token_dispatcher_type="alltoall",
    calculate_per_token_loss=True,
    train_iters=10,
    seed=1234,
)


def rl_overrides() -> dict:
    """GRPO_DEFAULTS plus megatron's clip flags set to `grpo.losses.PolicyLossConfig`'s defaults (imported here,
    not at module level: the preflight imports this module without torch)."""
    from megatron_r3.grpo.losses import PolicyLossConfig

    loss = PolicyLossConfig()
    return dict(GRPO_DEFAULTS, grpo_clamp_eps_lower=loss.clip_ratio_low, grpo_clamp_eps_upper=loss.clip_ratio_high)


def grpo_flag_dests() -> set[str]:
    """Dests of every flag `add_grpo_arguments` adds, without importing torch or megatron (the preflight's YAML key
    check): the plain flags plus the fields of the typed configs."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_plain_arguments(parser)
    return {action.dest for action in parser._actions} | {
        field.name for config_class, _ in TRAINER_CONFIGS for field in dataclasses.fields(config_class)}


def add_grpo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`extra_args_provider` for Megatron's parser: the flags megatron does not have, and the RL overrides of
    megatron's defaults."""
    _add_plain_arguments(parser)
    for config_class, title in TRAINER_CONFIGS:
        add_config_arguments(parser, config_class, title)
    parser.set_defaults(**rl_overrides())
    return parser


def _add_plain_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags not (yet) generated from a typed config."""
    group = parser.add_argument_group(title="megatron_r3 (GRPO with router replay)")
    group.add_argument("--config", type=str, default=None, help="YAML file; keys are flag names with '_'.")
    group.add_argument("--hf-checkpoint", type=str, default=None,
                       help="Hugging Face Qwen3-MoE checkpoint directory: architecture and initial weights.")
    group.add_argument("--hf-config", type=str, default=None,
                       help="Hugging Face config.json (or its directory) for a randomly initialised model.")


def build_parser() -> argparse.ArgumentParser:
    apply_python_compat()
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(description="GRPO with router replay on megatron-core", allow_abbrev=False)
    add_megatron_arguments(parser)
    escape_bare_percent_in_help(parser)
    add_rollout_arguments(parser)  # --rollout-engine (the registered engines), shared and per-engine flags
    return add_grpo_arguments(parser)


# argparse's help formatting (`help % params`) reads '%%' and '%(name)s'; any other '%' is a bare one
_PERCENT_TOKEN = re.compile(r"%%|%\(\w+\)[sdifr]|%")


def escape_bare_percent_in_help(parser: argparse.ArgumentParser) -> None:
    """megatron-core 0.19.2's help of --moe-paged-stash-buffer-size-factor-cuda contains a bare '%', which makes
    `--help` raise "ValueError: unsupported format character ')'"; escape such '%' so --help lists every flag."""
    for action in parser._actions:
        if isinstance(action.help, str) and "%" in action.help:
            action.help = _PERCENT_TOKEN.sub(lambda m: "%%" if m.group(0) == "%" else m.group(0), action.help)


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader whose booleans are YAML 1.2's (true/false only): `reference_replay: off` must stay the string
    'off', not become False (YAML 1.1 reads on/off/yes/no as booleans)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml_config(path: str) -> dict:
    """The YAML mapping of `path` (YAML 1.2 booleans), or a one-line ValueError naming the file."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.load(handle, Loader=_Yaml12Loader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"--config {path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: the YAML config must be a mapping of flag names to values")
    return values


def unknown_key_message(path: str, unknown: Sequence[str], known: Sequence[str]) -> str:
    import difflib

    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"{path}: unknown config keys {', '.join(hints)} (keys are flag names with '_')"


def yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """YAML values keyed by argparse dest, each converted and checked exactly as its flag on the command line would
    be (type, choices, number of values); unknown keys are errors (a typo must not be silently ignored)."""
    values = read_yaml_config(path)
    actions = {}
    for action in parser._actions:
        actions.setdefault(action.dest, action)
    unknown = sorted(key.replace("-", "_") for key in values if key.replace("-", "_") not in actions)
    if unknown:
        raise ValueError(unknown_key_message(path, unknown, sorted(actions)))
    return {key.replace("-", "_"): yaml_value(path, actions[key.replace("-", "_")], value)
            for key, value in values.items()}


def yaml_value(path: str, action: argparse.Action, value):
    """`value` converted by `action`'s type and checked against its choices, as argparse checks a CLI value.

    argparse's `set_defaults` skips both checks (choices are never checked for defaults, types only for string
    defaults), so a YAML typo such as `route_fallback: nativ` would otherwise pass silently."""
    key = action.dest
    flag = action.option_strings[0] if action.option_strings else key
    if value is None:
        return None
    if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction / store_const
        if type(value) is not bool:
            raise ValueError(f"{path}: {key}: {flag} is a switch; give true or false, not {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction) or isinstance(action.const, bool):
            return value  # the key is the dest: `masked_softmax_fusion: false` sets it False, whatever the flag
        return action.const if value else action.default
    many = action.nargs in ("*", "+", argparse.REMAINDER) or isinstance(action.nargs, int)
    if isinstance(value, dict):
        raise ValueError(f"{path}: {key}: a mapping is not a value of {flag}")
    if isinstance(value, list) and not many:
        raise ValueError(f"{path}: {key}: {flag} takes one value, not a list {value!r}")
    if many:
        items = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise ValueError(f"{path}: {key}: {flag} takes {action.nargs} values, got {len(items)}")
        return [_convert_one(path, action, flag, item) for item in items]
    return _convert_one(path, action, flag, value)


def _convert_one(path: str, action: argparse.Action, flag: str, value):
    if isinstance(value, (list, dict)):
        raise ValueError(f"{path}: {action.dest}: {value!r} is not a single value of {flag}")
    if type(value) is bool and action.type is not None and action.type not in (str,):
        raise ValueError(f"{path}: {action.dest}: {flag} takes a {getattr(action.type, '__name__', 'value')}, "
                         f"not {str(value).lower()}")
    text = value if isinstance(value, str) else str(value).lower() if type(value) is bool else str(value)
    converted = text
    if action.type is not None:
        try:
            converted = action.type(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            name = getattr(action.type, "__name__", "value")
            raise ValueError(f"{path}: {action.dest}: invalid {name} value {value!r} for {flag}"
                             + (f" ({error})" if isinstance(error, argparse.ArgumentTypeError) else "")) from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{path}: {action.dest}: invalid choice {value!r} for {flag} (choose from "
                         f"{', '.join(map(repr, action.choices))})")
    return converted


def parse_grpo_args(argv: Optional[Sequence[str]] = None, run_log=None, min_group_size: int = 2,
                    extra_honoured: Sequence[str] = ()) -> argparse.Namespace:
    """Parse with precedence defaults < YAML < CLI; architecture from the HF config; Megatron's validation.

    `run_log` (a `launch.RunLog`): once the run directory is known, the log file goes there and megatron's argument
    dump goes into it instead of the console. `extra_honoured`: megatron flags this entry point reads beyond the
    GRPO trainer's (megatron_flag_policy.py); every other megatron flag given a value is refused."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    config_path = pre.parse_known_args(argv)[0].config
    if config_path:
        parser.set_defaults(**yaml_defaults(parser, config_path))
    args = parser.parse_args(argv)
    args.config = config_path
    finish_args(args, parser, run_log=run_log, min_group_size=min_group_size, extra_honoured=extra_honoured)
    return args


def run_validate_args(args: argparse.Namespace, run_log=None) -> None:
    """megatron's `validate_args`, its argument dump into the run's log file, its bare asserts as one-line errors."""
    import traceback

    from megatron.training.arguments import validate_args

    try:
        if run_log is None:
            validate_args(args, {})
        else:
            from megatron_r3.train.launch import capture_stdout

            capture_stdout(run_log, validate_args, args, {})
    except AssertionError as error:
        frame = traceback.extract_tb(error.__traceback__)[-1]
        what = str(error) or f"`{frame.line}`"
        raise ValueError(f"megatron-core's validate_args rejected the arguments: {what} "
                         f"({os.path.basename(frame.filename)}:{frame.lineno})") from None


def finish_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser, run_log=None, min_group_size: int = 2,
    extra_honoured: Sequence[str] = (),
) -> argparse.Namespace:
    """Refuse megatron flags the run would ignore, model size from the HF config, run directory, then megatron's own
    `validate_args`."""
    from megatron_r3.model.specs import transformer_engine_available
    from megatron_r3.platform.cpu_support import apply_cpu_support
    from megatron_r3.replay.config_checks import check_layout, check_replay_config  # imports torch: not at the top
    from megatron_r3.train.components import check_engine_arguments
    from megatron_r3.train.megatron_flag_policy import check_ignored_flags

    check_ignored_flags(args, extra_honoured)

    apply_cpu_support()  # validate_args itself queries the GPU
    # megatron requires it with TP/CP on pre-Blackwell GPUs (ordering of communication kernels); must precede CUDA init
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

    if args.hf_checkpoint is None and args.hf_config is None:
        raise ValueError("give the model with --hf-checkpoint DIR or --hf-config FILE (a Qwen3-MoE config)")
    if args.task and args.prompt_data:
        raise ValueError("give either a built-in --task or --prompt-data FILE, not both (--task '' clears a YAML task)")
    if not args.task and not args.prompt_data:
        raise ValueError("give prompts with --prompt-data FILE (JSONL/parquet) or a built-in --task")
    check_engine_arguments(args)  # the chosen rollout engine's own flag checks
    args.rank = int(os.getenv("RANK", "0"))
    args.world_size = int(os.getenv("WORLD_SIZE", "1"))
    args.hf_model_config = load_hf_config_arg(args)
    check_architecture_conflicts(args, parser)
    if args.run_dir is None:
        import time

        args.run_dir = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if run_log is not None:
        run_log.attach(args.run_dir)
    args.save = args.save or os.path.join(args.run_dir, "checkpoints")
    if args.save_interval is None:  # megatron requires one with --save; default: a checkpoint at the end only
        args.save_interval = args.train_iters
    args.tensorboard_dir = args.tensorboard_dir or os.path.join(args.run_dir, "tensorboard")
    rollout_samples = args.grpo_prompts_per_step * args.grpo_group_size
    if args.global_batch_size is None:
        args.global_batch_size = rollout_samples
    if rollout_samples % args.global_batch_size:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} must divide the rollout batch of "
            f"{rollout_samples} samples (--grpo-prompts-per-step x --grpo-group-size)"
        )
    args._is_global_batch_size_explicitly_specified = True
    check_training_values(args, min_group_size)
    check_replay_config(args, args.router_replay)  # before the TE-less fallbacks switch fusions off silently
    check_layout(args, transformer_engine_available())
    disable_fusions_without_transformer_engine(args)
    apply_trainer_dtype(args)
    run_validate_args(args, run_log)
    check_replay_config(args, args.router_replay)
    return args


def check_training_values(args: argparse.Namespace, min_group_size: int = 2) -> None:
    """Values megatron accepts (or answers with a bare AssertionError) under which a run cannot train.

    `min_group_size` is 2 for GRPO (a group of one has advantage 0); the supervised warm-up uses groups of 1."""
    if not (math.isfinite(args.lr) and 0 < args.lr <= 1.0):
        raise ValueError(f"--lr {args.lr!r}: the learning rate must be a finite number in (0, 1]")
    if args.min_lr is not None and not (math.isfinite(args.min_lr) and 0 <= args.min_lr <= args.lr):
        raise ValueError(f"--min-lr {args.min_lr!r}: must be finite and in [0, --lr {args.lr!r}]")
    if args.train_iters is None or args.train_iters < 1:
        raise ValueError(f"--train-iters {args.train_iters}: give at least 1 training step")
    if args.grpo_group_size < min_group_size:
        raise ValueError(f"--grpo-group-size {args.grpo_group_size}: GRPO needs at least 2 samples per prompt (a "
                         f"group of one has advantage 0 everywhere and trains nothing)")
    if args.grpo_prompts_per_step < 1:
        raise ValueError(f"--grpo-prompts-per-step {args.grpo_prompts_per_step}: give at least 1 prompt per step")
    if args.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size {args.micro_batch_size}: must be at least 1")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.max_fallback_fraction is not None and not 0 <= args.max_fallback_fraction <= 1:
        raise ValueError(f"--max-fallback-fraction {args.max_fallback_fraction}: a fraction in [0, 1]")
    if args.min_routing_agreement is not None and not 0 <= args.min_routing_agreement <= 1:
        raise ValueError(f"--min-routing-agreement {args.min_routing_agreement}: a fraction in [0, 1]")


def apply_trainer_dtype(args: argparse.Namespace) -> None:
    """`--trainer-dtype`: bf16 by default on a GPU (megatron's mixed precision: fp32 master weights in the
    optimizer, fp32 router via --moe-router-dtype fp32 unless set) plus grouped-GEMM experts; fp32 on the CPU."""
    import torch

    choice = args.trainer_dtype
    if choice == "auto":
        if args.fp16 or args.bf16 or not torch.cuda.is_available():
            return
        choice = "bf16"
    args.bf16 = choice == "bf16"
    if args.bf16:
        args.fp16 = False
        if getattr(args, "moe_router_dtype", None) is None:
            args.moe_router_dtype = "fp32"
        if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
            args.moe_grouped_gemm = True  # model/grouped_experts.py without TE (torch._grouped_mm, bf16, Hopper+)


def gpu_compiled_fusions_available() -> bool:
    """Whether this process trains on a GPU where `model/fusions.py`'s compiled kernels run (CUDA and Triton)."""
    import torch

    from megatron_r3.model.fusions import compiled_fusions_available

    return torch.cuda.is_available() and compiled_fusions_available()


def disable_fusions_without_transformer_engine(args: argparse.Namespace) -> None:
    """Megatron turns on kernels that need TransformerEngine/apex by default (RoPE, softmax, SwiGLU fusion,
    gradient-accumulation fusion); without TE they raise at build time, so they are switched off, as the
    user would with --no-rope-fusion etc. The numerics are the unfused ones megatron defines.

    Kept on a GPU with Triton: megatron's SwiGLU fusion (`--bias-swiglu-fusion`, megatron's default; `jit_fuser`, i.e.
    `torch.compile`, needs no TE), which `GroupedExperts` and megatron's `MLP` use; `--no-bias-swiglu-fusion` still
    turns it off. On the CPU it is off (the CPU tests compare the eager formulas)."""
    from megatron_r3.model.specs import transformer_engine_available

    if transformer_engine_available():
        return
    off = ["apply_rope_fusion", "masked_softmax_fusion", "bias_gelu_fusion", "bias_dropout_fusion",
           "gradient_accumulation_fusion", "cross_entropy_loss_fusion", "moe_permute_fusion", "moe_router_fusion"]
    if not gpu_compiled_fusions_available():
        off.append("bias_swiglu_fusion")
    for name in off:
        if hasattr(args, name):
            setattr(args, name, False)
    args.no_persist_layer_norm = True
    args.transformer_impl = "local"


def load_hf_config_arg(args: argparse.Namespace):
    """The HF config of --hf-checkpoint DIR or --hf-config FILE (any file name), refused here when no model family
    represents it or when the chosen rollout engine cannot run it."""
    from megatron_r3.model.families import family_of, load_hf_config

    hf_config = load_hf_config(args.hf_checkpoint or args.hf_config)
    family = family_of(hf_config)
    family.arch(hf_config)
    refusal = family.hf_engine_refusal(hf_config) if getattr(args, "rollout_engine", None) == "hf" else None
    if refusal:
        raise ValueError(f"--rollout-engine hf: {refusal}")
    return hf_config


# Megatron network-size arguments the HF config decides; giving one of them a different value is a conflict.
_ARCH_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "max_position_embeddings", "rotary_base",
)


def check_architecture_conflicts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A network-size flag set (CLI or YAML) to something other than the HF config's value is an error, not
    silently overridden."""
    from megatron_r3.model.families import architecture_arg_names, family_of

    names = tuple(dict.fromkeys(_ARCH_ARGS + architecture_arg_names(args.hf_model_config)))
    before = {name: getattr(args, name, None) for name in names}
    overridable = family_of(args.hf_model_config).training_overridable_fields()
    explicit = frozenset(name for name in overridable
                         if hasattr(args, name) and getattr(args, name) != parser.get_default(name))
    apply_hf_architecture(args, args.hf_model_config, explicit)
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    conflicts = [
        f"{flags.get(name, '--' + name.replace('_', '-'))} {before[name]} "
        f"(the HF config says {getattr(args, name, None)})"
        for name in names
        if before[name] != parser.get_default(name) and before[name] != getattr(args, name, None)
    ]
    if conflicts:
        raise ValueError("the model architecture comes from the HF config; conflicting flags: " + ", ".join(conflicts))


def apply_hf_architecture(args: argparse.Namespace, hf_config, explicit: frozenset = frozenset()) -> None:
    """Write the HF model's megatron fields (its family's `megatron_fields`, the same the conversion path uses)
    into megatron's arguments; the TransformerConfig then comes from megatron's `core_transformer_config_from_args`.
    `explicit`: training-choice arguments the user set, which win over the HF config's (e.g. --moe-aux-loss-coeff)."""
    from megatron_r3.model.families import megatron_args_from_hf

    megatron_args_from_hf(args, hf_config, explicit)
    if args.seq_length is None:
        args.seq_length = args.max_position_embeddings
    args.use_cpu_initialization = True


def save_resolved_config(args: argparse.Namespace, path: str, extra_honoured: Sequence[str] = ()) -> None:
    """The resolved flags as YAML (reusable with --config): the final value of every flag the run honours. Megatron
    flags it ignores are left out: validate_args fills some of them (e.g. --encoder-seq-length), and
    `check_ignored_flags` would refuse them when the file is reused."""
    from megatron_r3.train.megatron_flag_policy import ignored_flags

    flags = {action.dest for action in build_parser()._actions} - {"help", "config"} - set(ignored_flags(extra_honoured))
    plain = {}
    for key, value in sorted(vars(args).items()):
        if key not in flags:
            continue
        plain_types = (str, int, float, bool, type(None))  # exact types: enums subclass int but are not plain
        if type(value) in plain_types or (
            type(value) in (list, tuple) and all(type(v) in plain_types for v in value)
        ):
            plain[key] = list(value) if isinstance(value, tuple) else value
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        yaml.safe_dump(plain, handle, sort_keys=True)
