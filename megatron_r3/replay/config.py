"""Router-replay settings: the one place their defaults are written (the flags are generated from the fields with
`platform.typed_config.add_config_arguments`; each field's docstring is its --help text)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass(frozen=True)
class ReplayConfig:
    """Router replay: which routes the passes use (replay/policy.py), bad routes, and the gates on them."""

    router_replay: Literal["off", "R2", "R3"] = "off"
    """off: native routing; R2: replay the trainer's old-logprob routes in the updates; R3: replay the rollout
    engine's routes in the old-logprob pass and the updates."""
    reference_replay: Literal["on", "off"] = "on"
    """Whether the reference-model (KL) pass replays the same routes as the policy."""
    route_fallback: Literal["raise", "native"] = "raise"
    """Bad routes in a sample: raise an error naming it (default), or route those tokens natively and count them in
    replay/fallback_tokens."""
    collect_routing_agreement: bool = field(
        default=True, metadata={"argparse_meta": {"arg_names": ["--collect-routing-agreement"],
                                                  "action": argparse.BooleanOptionalAction}})
    """Measure per layer how often native top-k equals the replayed set (old-logprob pass)."""
    max_fallback_fraction: Optional[float] = 0.01
    """Under --router-replay R3, fail when more than this fraction of a step's route rows fell back to native
    routing (--route-fallback native); 1 disables the gate."""
    min_routing_agreement: Optional[float] = 0.6
    """Under --router-replay R3, fail when replay/routing_agreement (trainer's native top-k vs the replayed routes)
    falls below this bound: healthy runs measure ~0.9-0.99, routes shifted to the wrong tokens ~0.3-0.5; 0 disables
    the gate."""
