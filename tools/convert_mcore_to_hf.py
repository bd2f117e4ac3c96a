#!/usr/bin/env python
"""Convert a megatron-core dist checkpoint (from tools/convert_hf_to_mcore.py or training) to a HF directory.

    python -m torch.distributed.run --nproc-per-node 2 tools/convert_mcore_to_hf.py \
        --checkpoint MCORE_DIR --out HF_DIR --expert-model-parallel-size 2

The checkpoint loads into any layout given here (it need not be the layout it was saved from). Parameters are
gathered across TP / expert-TP / EP / PP onto global rank 0, one parameter (or one layer's experts) at a time, and
written as safetensors shards (`model-0000k-of-0000N.safetensors` + `model.safetensors.index.json`, or a single
`model.safetensors`) with per-expert HF checkpoint names, plus config.json.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from convert_hf_to_mcore import add_layout_args, build_chunks  # noqa: E402

from megatron_r3.platform.dtypes import SHORT_NAMES, torch_dtype  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="megatron dist checkpoint directory")
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument("--hf-config", default=None,
                        help="HF config JSON file (any name) or model directory (default: hf_config.json stored in the checkpoint)")
    parser.add_argument("--dtype", choices=sorted(SHORT_NAMES), default="fp32",
                        help="dtype the model is built and loaded in")
    parser.add_argument("--save-dtype", choices=sorted(SHORT_NAMES), default=None,
                        help="dtype of the written safetensors (default: --dtype)")
    parser.add_argument("--max-shard-size-mb", type=float, default=5000.0, help="largest safetensors file")
    add_layout_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    from megatron_r3.model.dist_checkpoint import hf_config_of_dist_checkpoint, load_dist_checkpoint
    from megatron_r3.model.weights import save_hf_checkpoint

    if args.hf_config:
        from megatron_r3.model.families import load_hf_config

        hf_config = load_hf_config(args.hf_config)
    else:
        hf_config = hf_config_of_dist_checkpoint(args.checkpoint)
    arch, chunks, parallel = build_chunks(hf_config, args)
    load_dist_checkpoint(chunks, args.checkpoint)
    save_dtype = torch_dtype(args.save_dtype) if args.save_dtype else None
    written = save_hf_checkpoint(
        chunks, arch, hf_config, args.out, parallel, max_shard_bytes=int(args.max_shard_size_mb * 1024 * 1024),
        dtype=save_dtype,
    )
    if parallel.is_global_rank_zero:
        print(f"wrote HF model {args.out}: {', '.join(written)}", flush=True)


if __name__ == "__main__":
    main()
    from megatron_r3.platform.distributed import destroy

    destroy()
