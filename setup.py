"""megatron_r3: a Megatron-native GRPO engine for Mixture-of-Experts models with router replay (R2 / R3).

megatron-core is pinned to 0.19.2 but is NOT an install requirement here: its wheel declares Python >= 3.12 while it
runs on 3.11, so `make install` installs it with `--no-deps --ignore-requires-python` (see README).
"""

from setuptools import find_packages, setup

setup(
    name="megatron_r3",
    version="0.1.0",
    description="Megatron-native GRPO for MoE models with rollout routing replay (R3) and R2",
    packages=find_packages(include=["megatron_r3", "megatron_r3.*"]),
    package_data={"megatron_r3.train": ["megatron_flags.txt"]},  # preflight: megatron flag names without torch
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.6",
        "numpy",
        "packaging>=24.2",
        "triton",  # megatron-core 0.19.2 imports it unconditionally; it imports fine without a GPU
        "transformers>=5",  # the rollout engine captures routes from 5.x's Qwen3MoeTopKRouter (rollout/hf_capture.py)
        "safetensors",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "wandb",  # megatron's --wandb-* flags (train/metrics_log.py); offline without credentials
        "matplotlib",
        "requests",
        "pybase64",  # SGLang route payloads: ~4x faster base64 than the standard library
        "psutil",  # megatron.core.dist_checkpointing.save needs it
        "pyarrow",  # parquet prompt files
        "typing_extensions",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        "gpu": ["transformer-engine[pytorch]", "apex"],
        "sglang": ["sglang[srt]>=0.5.7"],
    },
)
