"""Compressed trace files read exactly as their plain CSV does, in every reader."""

import bz2
import gzip
import lzma
import shutil

import numpy as np
import pytest

from ondo.events.trace_input import TraceError, read_trace_records
from ondo.telemetry.replay import read_trace as read_replay_rows
from ondo.telemetry.trace_file import open_trace
from ondo.twin.traces import read_trace

PLAIN = "data/traces/ondo_serving_steps_w1_qwen3-0.6b_h200.csv"


@pytest.fixture(params=[(".xz", lzma.open), (".gz", gzip.open), (".bz2", bz2.open)],
                ids=["xz", "gz", "bz2"])
def compressed(request, tmp_path):
    suffix, opener = request.param
    path = tmp_path / f"trace.csv{suffix}"
    with open(PLAIN, "rb") as src, opener(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


def test_the_text_is_the_plain_file(compressed):
    with open_trace(compressed) as f, open(PLAIN, newline="") as g:
        assert f.read() == g.read()


def test_every_reader_gives_the_same_trace(compressed):
    a, b = read_trace(PLAIN), read_trace(compressed)
    assert len(a.t_s) == len(b.t_s) > 1000
    np.testing.assert_array_equal(a.temp_c, b.temp_c)
    np.testing.assert_array_equal(a.compute_activity, b.compute_activity)
    ra, rb = read_trace_records(PLAIN), read_trace_records(compressed)
    assert (ra.gpu_rows, ra.engine_rows) == (rb.gpu_rows, rb.engine_rows)
    assert ra.records == rb.records
    assert read_replay_rows(PLAIN)[:50] == read_replay_rows(compressed)[:50]


def test_a_bad_gzip_header_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "notgzip.csv.gz"
    path.write_bytes(open(PLAIN, "rb").read()[:4096])
    with pytest.raises(TraceError, match="notgzip.csv.gz: cannot read it"):
        read_trace_records(path)


def test_a_corrupt_compressed_file_is_an_error_not_a_short_trace(tmp_path):
    path = tmp_path / "broken.csv.xz"
    data = lzma.compress(open(PLAIN, "rb").read())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="broken.csv.xz: cannot read it"):
        read_trace(path)
    with pytest.raises(ValueError, match="broken.csv.xz: cannot read it"):
        read_replay_rows(path)
    with pytest.raises(TraceError, match="broken.csv.xz: cannot read it"):
        read_trace_records(path)
