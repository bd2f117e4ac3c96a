"""Faults the stand-in SGLang server injects (CLI ``--fault name=value``; ``POST /standin/faults``): counted from the
server start (or the last reset), HTTP-level ones per ``/generate`` request, route-level ones per sample served."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Faults:
    http_500_first: int = 0  # the first N /generate requests answer HTTP 500
    http_400_first: int = 0  # ... answer HTTP 400
    drop_connection_first: int = 0  # ... close the connection without a reply
    delay_first: int = 0  # ... are answered only after delay_s
    delay_s: float = 0.0
    abort_first: int = 0  # the first N samples finish with reason "abort"
    truncate_routes_first: int = 0  # ... carry base64 routes cut short
    wrong_rows_first: int = 0  # ... carry routes with one row missing
    omit_routes_first: int = 0  # ... carry no routed_experts at all
    duplicate_ids_first: int = 0  # ... carry routes whose every row repeats one expert id (unusable rows)
    shift_routes_first: int = 0  # ... carry routes shifted by one row (right count, valid ids, wrong tokens)
    routes_as_int_first: int = 0  # ... carry routed_experts as a JSON integer instead of base64
    neginf_logprob_first: int = 0  # ... carry -inf as the logprob of their first generated token
    fail_weight_update: bool = False  # /update_weights_* receive the tensors but answer success=false

    def update(self, values: dict) -> None:
        names = {f.name: f for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key not in names:
                raise ValueError(f"unknown fault {key!r}; known: {sorted(names)}")
            kind = type(getattr(self, key))
            setattr(self, key, value if kind is not bool else bool(value))

    @classmethod
    def parse(cls, items) -> "Faults":
        faults = cls()
        for item in items or []:
            key, _, value = item.partition("=")
            kind = type(getattr(faults, key, None))
            if kind is bool:
                faults.update({key: value.lower() in ("1", "true", "yes")})
            elif kind in (int, float):
                faults.update({key: kind(value)})
            else:
                raise ValueError(f"unknown fault {key!r}")
        return faults
