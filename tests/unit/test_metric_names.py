"""The metric-name registry: every name a producer can emit is registered and described (a short run's names are
checked in tests/e2e/test_grpo_cli.py)."""

from __future__ import annotations

import pathlib
import re

import pytest

from megatron_r3.grpo.mismatch import MISMATCH_KEYS
from megatron_r3.platform import metric_names
from megatron_r3.train.metrics_log import HEADLINE_KEYS
from megatron_r3.train.passes import POLICY_METRICS

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "megatron_r3"


def _constants() -> dict[str, str]:
    return {k: v for k, v in vars(metric_names).items() if k.isupper() and isinstance(v, str)}


def test_every_registered_name_is_described_on_one_line():
    for name, text in metric_names.DESCRIPTIONS.items():
        assert text.strip() and "\n" not in text and len(text) < 120, name
    prefixes = {v for k, v in _constants().items() if k.endswith("_PREFIX")}
    for key, value in _constants().items():
        if value not in prefixes:
            assert value in metric_names.DESCRIPTIONS, f"{key} = {value!r} has no description"


def test_computed_names_are_registered():
    for key in MISMATCH_KEYS:
        assert metric_names.is_registered(metric_names.mismatch(key)), key
    for key in POLICY_METRICS:
        assert metric_names.is_registered(metric_names.TRAIN_PREFIX + key), key
    for key in HEADLINE_KEYS:
        assert metric_names.is_registered(key), key
    assert metric_names.routing_agreement_layer(7) == "replay/routing_agreement/layer_7"
    assert metric_names.is_registered("replay/routing_agreement/layer_12")
    assert metric_names.describe("replay/routing_agreement/layer_12").startswith("replay/routing_agreement of")
    assert not metric_names.is_registered("replay/fallback_rows")
    with pytest.raises(KeyError, match="'replay/fallback_rows' is not a registered metric name"):
        metric_names.describe("replay/fallback_rows")


def test_no_producer_writes_a_metric_name_literal():
    """Producers use the registry's constants: a quoted "group/name" that is a registered metric name appears only in
    metric_names.py."""
    registered = set(metric_names.DESCRIPTIONS)
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "metric_names.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for literal in re.findall(r'(?<![\w`])"([a-z0-9_]+/[a-z0-9_/]+)"', code):
                if literal in registered:
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {literal}")
    assert not offenders, offenders
