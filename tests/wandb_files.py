"""Reading an offline W&B run's files back, for tests: records, history rows, run folders."""

import json
import struct
import time
import zlib
from pathlib import Path


def wandb_records(path: Path):
    """The protobuf `Record`s of a `run-*.wandb` file.

    wandb 0.31 has no Python reader any more (the Go core writes and reads these), so this follows
    the format: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then LevelDB-log framing in
    32 KiB blocks: each chunk has a 7-byte header (crc32 seeded with the chunk type, length, type:
    1 full, 2 first, 3 middle, 4 last), and a block tail under 7 bytes is padding.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    pos, pending, block = 7, b"", 32768
    while True:
        if block - pos % block < 7:
            pos += block - pos % block
        if pos + 7 > len(data):
            return
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def settled_records(path: Path, timeout: float = 30.0) -> list:
    """All records of a finished run's file. wandb's core process may still be flushing when
    `finish()` returns: wait until the file holds the run's `exit` record and stops growing."""
    deadline = time.monotonic() + timeout
    while True:
        size = path.stat().st_size
        records = list(wandb_records(path))
        done = any(r.WhichOneof("record_type") == "exit" for r in records)
        if (done and path.stat().st_size == size) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history_rows(records) -> list[dict]:
    """History records as {"a.b": value} dicts; items name their key in `key` or `nested_key`."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def one_run_dir(wandb_dir: Path, run_id: str) -> Path:
    (found,) = run_dirs(wandb_dir, run_id)
    return found


def run_dirs(wandb_dir: Path, run_id: str) -> list[Path]:
    # A second run with the same id in the same second gets a "-1" suffix.
    return sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
