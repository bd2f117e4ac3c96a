"""megatron_r3: a Megatron-native GRPO engine for Mixture-of-Experts models with router replay (R2 / R3)."""

__version__ = "0.1.0"
