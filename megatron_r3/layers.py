"""The package's layer order, written once. A module may import from its own layer and the layers before it, never
from a later one (`tests/unit/test_layering.py` enforces it by reading every module's imports).

- `platform`: process, collectives, parallel context, typed configs, logging, CPU support. Knows nothing of RL.
- `replay`: route layouts, the replay router and its state, config checks that reject replay bypasses, the
  per-pass replay policy.
- `model`: model families (HF config <-> megatron config, checkpoint names, specs), experts, attention, weights.
- `grpo`: advantages, losses, train/inference mismatch metrics.
- `rollout`: rollout engines (embedded hf, SGLang), their wire codecs and weight sync.
- `train`: the trainer, arguments, data, rewards, checkpoints; the only layer that sees argparse namespaces.
"""

LAYERS = ("platform", "replay", "model", "grpo", "rollout", "train")
