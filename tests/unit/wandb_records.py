"""Read the history rows back from a W&B run file (`run-ID.wandb`), so tests check what W&B really stored.

The file is W&B's record log: a 7-byte header (`:W&B`, a 2-byte magic, a version byte), then LevelDB-style blocks of
32 KiB holding records of `crc32 (4 bytes) | length (2, little-endian) | type (1: full, 2: first, 3: middle,
4: last)` followed by that many bytes of a serialised `wandb_internal_pb2.Record`; a block tail shorter than a record
header is zero padding.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        body = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            yield pending + body
        elif kind == 0 and length == 0:
            continue
        else:
            raise ValueError(f"record type {kind} at byte {pos}")


def history_rows(run_file: Path) -> list[dict]:
    """The `wandb.log` rows of a run, each a dict of key -> value (W&B adds `_step`, `_runtime`, `_timestamp`)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for body in _records(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(body)
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
