"""Read an offline W&B run back (test helper).

A run's ``run-<id>.wandb`` file is a LevelDB-style log (a 7-byte W&B header, then 32 KiB blocks
of records: crc32, length, type FULL / FIRST / MIDDLE / LAST) of ``wandb_internal_pb2.Record``
protobufs. wandb ships the protobuf classes but, since its Go core, no Python reader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, LAST = 1, 4


def records(path: Path):
    data, position, pending = path.read_bytes(), HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        _, length, kind = (
            struct.unpack("<IHB", data[position : position + HEADER]) if left >= HEADER else (0, 0, 0)
        )
        if left < HEADER or (length == 0 and kind == 0):  # block trailer / padding
            position += left
            continue
        pending += data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history(run_dir: Path) -> list[dict]:
    """Every ``log`` call of the run: {key: decoded JSON value}."""
    rows = []
    for record in records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            )
    return rows
