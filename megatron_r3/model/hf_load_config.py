"""Loading a Hugging Face checkpoint: what happens to checkpoint tensors the megatron model does not build.

DeepSeek-V3 and GLM-4.5 checkpoints hold `num_nextn_predict_layers` MTP (multi-token prediction) layers after the
decoder, as `model.layers.{num_hidden_layers + i}.*`. No family builds them (megatron's `mtp_num_layers` stays None),
so loading would drop them and every HF export of the trained model would lack them. That is refused unless the run
says so: `--mtp-checkpoint-tensors skip` loads the decoder without them, counted and said once.

This module imports no torch at import time (the trainer's preflight reads `HFLoadConfig`'s flags without torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal

from megatron_r3.platform.logging import get_logger

if TYPE_CHECKING:
    from megatron_r3.model.families import ModelArch

log = get_logger(__name__)

MTP_FLAG = "--mtp-checkpoint-tensors"


@dataclass(frozen=True)
class HFLoadConfig:
    """Loading a Hugging Face checkpoint into the megatron model."""

    mtp_checkpoint_tensors: Literal["refuse", "skip"] = "refuse"
    """A checkpoint's MTP layers (DeepSeek-V3 / GLM-4.5 num_nextn_predict_layers) are not built: 'refuse' stops the
    load naming them; 'skip' loads the decoder without them (counted and logged once). HF exports of the trained
    model then contain no MTP layers."""


def _layers_text(arch: ModelArch) -> str:
    return ", ".join(f"model.layers.{arch.num_layers + i}.*" for i in range(arch.num_mtp_layers))


def check_mtp_checkpoint_tensors(arch: ModelArch, names: Iterable[str], config: HFLoadConfig) -> int:
    """The number of MTP tensors among checkpoint tensor `names` that the load leaves out (0 when there are none).
    Every rank reads the same names, so every rank raises (a `MappingError` naming the tensors, their layers and the
    flag) or skips alike; a skip is logged once (rank 0)."""
    from megatron_r3.model.families import family_for
    from megatron_r3.model.hf_mapping import MappingError

    mtp = family_for(arch.model_type).mtp_checkpoint_names(arch, names)
    if not mtp:
        return 0
    what = (f"{len(mtp)} MTP tensors ({_layers_text(arch)}: num_nextn_predict_layers={arch.num_mtp_layers}) that the "
            f"{arch.model_type} model does not build")
    if config.mtp_checkpoint_tensors == "refuse":
        raise MappingError(f"the checkpoint holds {what}; pass {MTP_FLAG} skip to load the decoder without them "
                           "(HF exports of the trained model will then not contain them)")
    log.info(f"{MTP_FLAG} skip: skipped {what}; HF exports of the trained model will not contain them")
    return len(mtp)
