"""Validate a multi-node GRPO + SGLang layout on one machine, without GPUs.

    python tools/cluster_dry_run.py --config configs/qwen3_30b_a3b.yaml --trainer-nodes 2 --sglang-nodes 2 \\
        --gpus-per-node 8 --sglang-tp-size 4 [-- extra pretrain_grpo.py flags]

What it does:
1. Parses the config exactly as ``pretrain_grpo.py`` would on rank 0 of the target world
   (``megatron_r3.train.arguments.parse_grpo_args`` with ``WORLD_SIZE`` = trainer nodes x GPUs per node), which
   runs megatron's own ``validate_args`` and the replay config checks. Megatron's verdict is reported verbatim.
2. Checks the layout with precise messages: trainer GPUs vs TP x PP x CP, tensor parallel inside a node, EP / ETP
   against the experts and megatron's expert layout (EP x ETP must divide world / PP, i.e. EP | DP x CP when
   ETP = TP), layers vs PP (and VP, or uneven first/last stages), heads and query groups vs TP, vocabulary padding,
   batch divisibility (rollout samples, global batch, data-parallel size, micro-batches), SGLang TP vs GPUs per node
   and vs the attention heads, the weight-update group size, and a rough per-GPU memory estimate.
3. Prints a table and exits 1 with the failing checks' messages (0 when everything holds).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

OK, WARN, FAIL, INFO = "ok", "WARN", "FAIL", "info"


@dataclass
class Check:
    name: str
    value: str
    status: str
    message: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    args: Optional[argparse.Namespace] = None

    def add(self, name: str, value, ok: bool = True, message: str = "", *, warn: bool = False, info: bool = False):
        status = INFO if info else (OK if ok else (WARN if warn else FAIL))
        self.checks.append(Check(name, str(value), status, "" if ok and not info else message))

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        vwidth = min(40, max(len(c.value) for c in self.checks))
        lines = [f"{'check':<{width}}  {'value':<{vwidth}}  status", "-" * (width + vwidth + 10)]
        for c in self.checks:
            line = f"{c.name:<{width}}  {c.value:<{vwidth}}  {c.status}"
            if c.message:
                line += f"  - {c.message}"
            lines.append(line)
        return "\n".join(lines)


@contextlib.contextmanager
def _target_world(world_size: int):
    keys = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def parse_for_world(config: str, extra: Sequence[str], world_size: int):
    """megatron's parse + validate_args for rank 0 of a `world_size` world; (args, None) or (None, error text)."""
    from megatron_r3.train.arguments import parse_grpo_args

    out = io.StringIO()
    try:
        with _target_world(world_size), contextlib.redirect_stdout(out):
            args = parse_grpo_args(["--config", config, *extra])
    except SystemExit as error:  # argparse
        return None, f"argument parsing failed (exit {error.code}); see the messages above"
    except (AssertionError, ValueError, TypeError, RuntimeError) as error:
        text = str(error) or type(error).__name__
        return None, f"{type(error).__name__}: {text}"
    return args, None


def parse_without_validation(config: str, extra: Sequence[str], world_size: int):
    """The arguments as parse_grpo_args builds them, minus megatron's validate_args (so that the layout checks can
    still name what is wrong when megatron's assertion stopped at the first problem)."""
    from megatron_r3.train.arguments import apply_hf_architecture, build_parser, load_hf_config_arg, yaml_defaults

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            parser = build_parser()
            parser.set_defaults(**yaml_defaults(parser, config))
            args = parser.parse_args(["--config", config, *extra])
            args.world_size, args.rank = world_size, 0
            apply_hf_architecture(args, load_hf_config_arg(args))
        if args.global_batch_size is None:
            args.global_batch_size = args.grpo_prompts_per_step * args.grpo_group_size
    except SystemExit as error:
        return None, f"argument parsing failed (exit {error.code})"
    except Exception as error:  # noqa: BLE001 - reported in the table
        return None, f"{type(error).__name__}: {error}"
    return args, None


def check_cluster(
    config: str,
    *,
    trainer_nodes: int,
    gpus_per_node: int,
    sglang_nodes: int,
    sglang_tp_size: int,
    extra: Sequence[str] = (),
    gpu_memory_gb: float = 80.0,
) -> Report:
    report = Report()
    world = trainer_nodes * gpus_per_node
    report.add("nodes (trainer + SGLang)", f"{trainer_nodes} + {sglang_nodes}", trainer_nodes >= 1 and sglang_nodes >= 0,
               "need at least one trainer node")
    report.add("trainer GPUs (world size)", f"{trainer_nodes} x {gpus_per_node} = {world}", world >= 1)
    args, error = parse_for_world(config, extra, max(1, world))
    report.args = args
    report.add("megatron validate_args + replay checks", "passed" if args else "raised", args is not None,
               error or "")
    if args is None:  # still run the layout checks below, on the arguments before megatron's validation
        args, raw_error = parse_without_validation(config, extra, max(1, world))
        if args is None:
            report.add("configuration parses", "no", False, raw_error)
            return report
        report.args = args
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    model_parallel = tp * pp * cp
    report.add("TP x PP x CP divides world", f"{tp} x {pp} x {cp} = {model_parallel}", world % model_parallel == 0,
               f"world size {world} is not divisible by TP x PP x CP = {model_parallel}")
    dp = world // model_parallel if world % model_parallel == 0 else 0
    report.add("data-parallel size", dp, info=True, message="world / (TP x PP x CP)")
    report.add("TP within a node", f"TP {tp}, {gpus_per_node} GPUs/node", gpus_per_node % tp == 0,
               f"TP {tp} spans nodes (GPUs per node {gpus_per_node}); tensor parallelism needs NVLink", warn=True)

    num_experts = args.num_experts or 0
    report.add("EP divides experts", f"{num_experts} experts / EP {ep}", num_experts % ep == 0,
               f"{num_experts} experts do not split evenly over EP {ep}")
    expert_span = etp * ep
    dense_span = tp * cp * dp  # ranks of one pipeline stage
    expert_ok = dp > 0 and dense_span % expert_span == 0
    report.add("EP x ETP divides TP x CP x DP", f"{ep} x {etp} | {tp} x {cp} x {dp}", expert_ok,
               f"megatron lays experts over the ranks of a pipeline stage: EP x ETP = {expert_span} must divide "
               f"TP x CP x DP = {dense_span}" + (f" (with ETP = TP: EP {ep} must divide DP x CP = {dp * cp})"
                                                 if etp == tp else ""))
    if expert_ok:
        report.add("expert data-parallel size", dense_span // expert_span, info=True,
                   message="world / (PP x ETP x EP)")

    layers = args.num_layers
    first = args.decoder_first_pipeline_num_layers
    last = args.decoder_last_pipeline_num_layers
    if first is None and last is None:
        report.add("layers divisible by PP", f"{layers} / PP {pp}", layers % pp == 0,
                   f"{layers} layers do not split over {pp} pipeline stages (or set "
                   "--decoder-first/last-pipeline-num-layers)")
        per_stage = layers // pp if layers % pp == 0 else None
    else:
        middle = layers - (first or 0) - (last or 0)
        stages = pp - (first is not None) - (last is not None)
        ok = middle >= 0 and (stages == 0 and middle == 0 or stages > 0 and middle % stages == 0)
        report.add("uneven pipeline stages", f"first {first}, last {last}, {middle} layers / {stages} stages", ok,
                   f"after the first/last stages, {middle} layers do not split over {stages} middle stages")
        per_stage = middle // stages if ok and stages > 0 else None
    vp_layers = args.num_layers_per_virtual_pipeline_stage
    if vp_layers:
        ok = per_stage is not None and per_stage % vp_layers == 0
        report.add("layers per stage divisible by VP chunk", f"{per_stage} / {vp_layers}", ok,
                   f"{per_stage} layers per pipeline stage are not a multiple of "
                   f"--num-layers-per-virtual-pipeline-stage {vp_layers}")
    report.add("heads divisible by TP", f"{args.num_attention_heads} / {tp}", args.num_attention_heads % tp == 0,
               f"{args.num_attention_heads} attention heads do not split over TP {tp}")
    groups = args.num_query_groups or args.num_attention_heads
    report.add("query groups divisible by TP", f"{groups} / {tp}", groups % tp == 0,
               f"{groups} query groups (KV heads) do not split over TP {tp}")
    from megatron_r3.model.families import padded_vocab_size

    padded = padded_vocab_size(args.vocab_size, tp, args.make_vocab_size_divisible_by)
    report.add("vocabulary padding", f"{args.vocab_size} -> {padded}", True, info=True,
               message=f"{padded - args.vocab_size} pad rows (zero on import, dropped on export)")
    if cp > 1:
        report.add("sequence length divisible by 2 x CP", f"{args.seq_length} / {2 * cp}",
                   args.seq_length % (2 * cp) == 0, f"--seq-length {args.seq_length} is not a multiple of 2 x CP")

    rollout = args.grpo_prompts_per_step * args.grpo_group_size
    gbs = args.global_batch_size
    report.add("rollout samples / global batch", f"{rollout} / {gbs}", rollout % gbs == 0,
               f"{rollout} samples per step do not split into mini-batches of {gbs}")
    report.add("global batch / data-parallel", f"{gbs} / {dp}", dp > 0 and gbs % dp == 0,
               f"--global-batch-size {gbs} is not divisible by the data-parallel size {dp}")
    if dp and gbs % dp == 0 and not args.max_tokens_per_microbatch:
        per_rank = gbs // dp
        report.add("per-rank mini-batch / micro batch", f"{per_rank} / {args.micro_batch_size}",
                   per_rank % args.micro_batch_size == 0,
                   f"{per_rank} samples per rank do not form whole micro-batches of {args.micro_batch_size}")
    if args.max_tokens_per_microbatch:
        report.add("sample fits a packed micro-batch", f"{args.seq_length} <= {args.max_tokens_per_microbatch}",
                   args.seq_length <= args.max_tokens_per_microbatch,
                   f"a full-length sample ({args.seq_length} tokens) exceeds --max-tokens-per-microbatch", warn=True)

    # SGLang side
    if args.rollout_engine == "sglang" or sglang_nodes:
        stp = sglang_tp_size
        report.add("SGLang TP within a node", f"TP {stp}, {gpus_per_node} GPUs/node",
                   stp >= 1 and gpus_per_node % stp == 0,
                   f"SGLang TP {stp} must divide the GPUs per node ({gpus_per_node}); the launcher starts servers "
                   "inside one node")
        per_node = gpus_per_node // stp if stp >= 1 and gpus_per_node % stp == 0 else 0
        servers = sglang_nodes * per_node
        report.add("SGLang servers", f"{sglang_nodes} nodes x {per_node} = {servers}",
                   servers >= 1, "no SGLang server fits this layout")
        heads = args.num_attention_heads
        report.add("SGLang TP divides heads", f"{heads} / {stp}", heads % stp == 0,
                   f"SGLang shards {heads} attention heads over TP {stp}")
        report.add("SGLang TP vs KV heads", f"{groups} KV heads, TP {stp}", groups % stp == 0 or stp % groups == 0,
                   f"SGLang needs KV heads ({groups}) divisible by TP {stp} or TP divisible by them")
        if args.weight_sync == "distributed":
            report.add("weight-update group", f"1 + {sglang_nodes * gpus_per_node} ranks", True, info=True,
                       message="trainer rank 0 + every SGLang GPU worker (NCCL)")
        else:
            report.add("weight sync directory", args.weight_sync_dir or "(missing)", bool(args.weight_sync_dir),
                       "--weight-sync disk needs --weight-sync-dir on shared storage")
        report.add("SGLang requests per step", rollout, True, info=True,
                   message=f"{args.sglang_max_concurrency} in flight at most")

    # rough memory per trainer GPU: bf16 weights + fp32 grads + fp32 master/Adam (sharded with the dist. optimizer)
    if dp:
        dense, experts = _parameter_counts(args)
        per_gpu = dense / (tp * pp) + experts / (ep * etp * pp)
        shards = dp if args.use_distributed_optimizer else 1
        expert_shards = (dense_span // expert_span) if (args.use_distributed_optimizer and expert_ok) else 1
        dense_bytes = dense / (tp * pp) * (2 + 4 + 12 / shards)
        expert_bytes = experts / (ep * etp * pp) * (2 + 4 + 12 / max(1, expert_shards))
        gb = (dense_bytes + expert_bytes) / 1e9
        report.add("parameters (total / per GPU)", f"{(dense + experts) / 1e9:.2f} B / {per_gpu / 1e9:.2f} B", True,
                   info=True, message="per GPU: dense / (TP x PP) + experts / (EP x ETP x PP)")
        report.add("weights+grads+Adam per GPU", f"{gb:.1f} GB of {gpu_memory_gb:g}", gb < 0.8 * gpu_memory_gb,
                   f"model states alone take {gb:.1f} GB (activations come on top)", warn=True)
    return report


def _parameter_counts(args) -> tuple[float, float]:
    """(dense, routed-expert) parameter counts from the megatron arguments (embeddings and output included)."""
    from megatron_r3.replay.layout import moe_layer_pattern

    h, layers = args.hidden_size, args.num_layers
    heads, groups, kv = args.num_attention_heads, args.num_query_groups or args.num_attention_heads, args.kv_channels
    attention = h * kv * (heads + 2 * groups) + heads * kv * h
    moe_layers = sum(moe_layer_pattern(layers, args.moe_layer_freq))
    dense_mlp = 3 * h * args.ffn_hidden_size * (layers - moe_layers)
    shared = 3 * h * (args.moe_shared_expert_intermediate_size or 0) * moe_layers
    router = h * (args.num_experts or 0) * moe_layers
    vocab = args.vocab_size * h * (1 if not args.untie_embeddings_and_output_weights else 2)
    dense = layers * attention + dense_mlp + shared + router + vocab
    experts = 3 * h * (args.moe_ffn_hidden_size or 0) * (args.num_experts or 0) * moe_layers
    return float(dense), float(experts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pretrain_grpo.py YAML config")
    parser.add_argument("--trainer-nodes", type=int, required=True)
    parser.add_argument("--sglang-nodes", type=int, default=0)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--sglang-tp-size", type=int, default=1)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    opts = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = check_cluster(opts.config, trainer_nodes=opts.trainer_nodes, gpus_per_node=opts.gpus_per_node,
                           sglang_nodes=opts.sglang_nodes, sglang_tp_size=opts.sglang_tp_size, extra=extra,
                           gpu_memory_gb=opts.gpu_memory_gb)
    print(f"cluster dry run: {opts.config} on {opts.trainer_nodes} trainer + {opts.sglang_nodes} SGLang nodes x "
          f"{opts.gpus_per_node} GPUs" + (f" (extra flags: {' '.join(extra)})" if extra else ""))
    print(report.table())
    if report.failures:
        print(f"\nFAILED: {len(report.failures)} check(s):", file=sys.stderr)
        for check in report.failures:
            print(f"  - {check.name}: {check.message}", file=sys.stderr)
        return 1
    print("\nOK: the configuration is consistent for this cluster layout.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
