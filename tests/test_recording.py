"""The recording file: round trip, pandas in one call, damage and recovery."""
from __future__ import annotations

import pandas as pd
import pytest

from tracer.recording import MAGIC, RecordingError, Writer, read


def _write(path, intervals=3, close=True):
    w = Writer(path, {"host": "h1", "kernel": "6.18"})
    for i in range(intervals):
        w.write([{"t": i + 1.0, "interval": i, "record": "count", "name": "new_ksm_page",
                  "pid": 10, "comm": "qemu", "vm": "vm-a", "value": 7 + i},
                 {"t": i + 1.0, "interval": i, "record": "interval", "name": "end",
                  "pid": 0, "value": 1_000_000_000}])
    if close:
        w.close()
    return w


def test_closed_recording_is_plain_feather(tmp_path):
    path = tmp_path / "r.arrow"
    _write(path)
    df = pd.read_feather(path)
    assert len(df) == 6
    rec = read(path)
    assert rec.closed and not rec.notes
    assert rec.meta["host"] == "h1" and rec.meta["schema"] == 1
    assert rec.frame().query("record == 'count'").value.tolist() == [7, 8, 9]


def test_unclosed_recording_reads_every_interval(tmp_path):
    """What kill -9 leaves: no footer."""
    path = tmp_path / "r.arrow"
    w = _write(path, close=False)
    rec = read(path)
    assert not rec.closed
    assert rec.table.num_rows == 6
    assert "not closed" in rec.notes[0]
    w.close()


def test_truncated_in_the_middle_of_an_interval(tmp_path):
    path = tmp_path / "r.arrow"
    _write(path, close=False)
    data = path.read_bytes()
    path.write_bytes(data[:-50])
    rec = read(path)
    assert rec.table.num_rows == 4          # the last interval is lost, no more
    assert rec.damaged_bytes > 0


@pytest.mark.parametrize("content,message", [
    (b"", "not an overcommit recording"),
    (b"hello world", "not an overcommit recording"),
    (MAGIC + b"\0\0", "truncated or corrupt"),
])
def test_damaged_files_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.arrow"
    path.write_bytes(content)
    with pytest.raises(RecordingError, match=message):
        read(path)


def test_missing_file(tmp_path):
    with pytest.raises(RecordingError, match="No such file"):
        read(tmp_path / "nope.arrow")


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "r.arrow"
    w = Writer(path, {"schema": 99})
    w.close()
    with pytest.raises(RecordingError, match="newer"):
        read(path)
