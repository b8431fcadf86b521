"""The recording file: one Arrow IPC (Feather v2) file, one long table.

A cleanly closed recording is an ordinary Feather file::

    df = pandas.read_feather("ksm.arrow")

and its metadata is ``json.loads(pyarrow.ipc.open_file(path).schema.metadata[b"overcommit"])``.

Crash safety comes from the layout of the IPC file format: the magic, then
the schema and the record batches exactly as in the stream format, then a
footer written on close.  Every interval is one record batch, flushed and
fsync'ed, so after ``kill -9`` everything but the footer (and at most the
interval being written) is on disk; :func:`read` then reads the batches as a
stream and reports the recording as not closed.

Rows (column ``record`` says which kind of row):

===========  ===========================================================
record       meaning
===========  ===========================================================
count        in-kernel event counts of one interval: name = event kind,
             pid/comm/vm = the process the pages belong to, value = count
ksm          /sys/kernel/mm/ksm/<name> sampled at the end of the interval
vmstat       /proc/vmstat <name>
ksm_stat     /proc/<pid>/ksm_stat <name> of a KSM process
process      a process seen: name = ksm_enter, ksm_exit, running (there at
             the start), gone; t = when
scan         one full pass of ksmd: seq, duration_ns, value = rmap_entries
advisor      a KSM advisor decision: name = pages_to_scan / cpu_percent /
             scan_time_ns, value
event        one streamed event (--events): name = kind, pid, pfn, err
lost         events lost so far (cumulative): name = kind, value
interval     end of interval: value = its length in ns
end          the recording was closed cleanly
qmp          the lab (tracer/lab.py): a guest's balloon as QEMU reports it,
             pid/comm/vm = the QEMU process: name = balloon_actual (guest
             RAM less the balloon, bytes: query-balloon `actual`),
             balloon_pages (the balloon, 4 KiB pages), balloon_target
             (bytes, the last `balloon` command)
guest_stats  the lab: a guest's own statistics through its balloon driver
             (QMP guest-stats, "stat-" dropped, "-" as "_"), pid/comm/vm =
             the QEMU process: free_memory, available_memory, total_memory,
             disk_caches, swap_in, swap_out (bytes), major_faults,
             minor_faults, htlb_pgalloc, htlb_pgfail (counts)
lab          the lab: a phase begins: name = boot, merge, inflate, deflate,
             done
===========  ===========================================================

``t`` is seconds since the start of the recording (CLOCK_MONOTONIC).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.ipc as ipc

SCHEMA_VERSION = 1
MAGIC = b"ARROW1"
META_KEY = b"overcommit"

COLUMNS = pa.schema([
    ("t", pa.float64()),
    ("interval", pa.int32()),
    ("record", pa.string()),
    ("name", pa.string()),
    ("pid", pa.int32()),
    ("comm", pa.string()),
    ("vm", pa.string()),
    ("value", pa.int64()),
    ("pfn", pa.uint64()),
    ("err", pa.int32()),
    ("seq", pa.int64()),
    ("duration_ns", pa.int64()),
])


class RecordingError(Exception):
    """A recording that cannot be read: one line for the user."""


class Writer:
    """Appends one record batch per interval; survives being killed."""

    def __init__(self, path: Path | str, meta: dict[str, Any]):
        self.path = Path(path)
        meta = {"schema": SCHEMA_VERSION, **meta}
        try:
            self._file: BinaryIO = open(self.path, "wb")
        except OSError as e:
            raise RecordingError(f"cannot write {path}: {e.strerror}") from e
        self._writer = ipc.new_file(
            self._file, COLUMNS.with_metadata({META_KEY: json.dumps(meta)}),
            options=ipc.IpcWriteOptions(compression="zstd"))
        self._sync()

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        cols = {name: [r.get(name) for r in rows] for name in COLUMNS.names}
        self._writer.write_batch(pa.RecordBatch.from_pydict(cols, schema=COLUMNS))
        self._sync()

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._writer.close()
        self._sync()
        self._file.close()


@dataclass
class Recording:
    path: Path
    meta: dict[str, Any]
    table: pa.Table
    closed: bool                 # footer present: closed cleanly
    damaged_bytes: int = 0       # trailing bytes that could not be read
    notes: list[str] = field(default_factory=list)

    def frame(self):
        """The rows as a pandas DataFrame (strings as categories)."""
        df = self.table.to_pandas()
        for col in ("record", "name", "comm", "vm"):
            df[col] = df[col].astype("category")
        return df


def read(path: Path | str) -> Recording:
    """Read a recording, closed or not. Raises RecordingError with one line.

    The file is memory-mapped: only the decoded table is held in memory."""
    path = Path(path)
    try:
        data = pa.memory_map(str(path))
    except (OSError, pa.ArrowIOError) as e:
        raise RecordingError(f"{path}: {getattr(e, 'strerror', None) or e}") from e
    # Not closed explicitly: buffers of the table may point into the mapping.
    buf = data.read_buffer()
    if buf.size < 8 or buf.slice(0, 6).to_pybytes() != MAGIC:
        raise RecordingError(f"{path}: not an overcommit recording (no Arrow IPC magic)")
    if buf.slice(buf.size - 6).to_pybytes() == MAGIC:
        try:
            table = ipc.open_file(buf).read_all()
            return Recording(path, _meta(table.schema, path), table, closed=True)
        except pa.ArrowInvalid:
            pass  # a footer-looking tail that is not one: read as a stream
    return _read_unclosed(path, buf)


def _read_unclosed(path: Path, buf: pa.Buffer) -> Recording:
    # The IPC file format pads the 6-byte magic to 8 bytes; the stream follows.
    stream = pa.BufferReader(buf.slice(8))
    try:
        reader = ipc.open_stream(stream)
    except (pa.ArrowInvalid, OSError) as e:
        raise RecordingError(f"{path}: truncated or corrupt before the first interval ({e})") from e
    batches, good_end = [], stream.tell()
    while True:
        try:
            batches.append(reader.read_next_batch())
            good_end = stream.tell()
        except StopIteration:
            break
        except (pa.ArrowInvalid, OSError, EOFError):
            break
    table = pa.Table.from_batches(batches, schema=reader.schema)
    damaged = buf.size - 8 - good_end
    rec = Recording(path, _meta(reader.schema, path), table, closed=False,
                    damaged_bytes=max(damaged, 0))
    rec.notes.append("recording was not closed (the recorder was killed?): "
                     f"{len(batches)} record batches read"
                     + (f", {rec.damaged_bytes} trailing bytes unreadable" if rec.damaged_bytes else ""))
    return rec


def _meta(schema: pa.Schema, path: Path) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise RecordingError(f"{path}: Arrow file without overcommit metadata")
    meta = json.loads(raw)
    if meta.get("schema", 0) > SCHEMA_VERSION:
        raise RecordingError(f"{path}: recording schema {meta['schema']} is newer "
                             f"than this overcommit understands ({SCHEMA_VERSION})")
    return meta
