"""Buffer-level behaviour: decompression formats and fallbacks, merge order."""

from __future__ import annotations

import numpy as np
import pytest

from pooltrace.etl.buffers import BufferIndex, decompress, reading_order
from pooltrace.etl.xpress import compress


def test_lzxpress_round_trip_through_libfwnt():
    data = bytes(range(256)) * 40 + b"tail"
    assert decompress(compress(data), len(data), 3) == data


def test_lzxpress_match_longer_than_libfwnt_accepts():
    data = b"\x00" * 40_000 + b"end of buffer"
    comp = compress(data, max_match=None)
    assert decompress(comp, len(data), 0x00010003) == data  # State's high word is ignored


@pytest.mark.parametrize("state", [2, 3, 4])
def test_corrupt_compressed_data_is_a_value_error(state):
    with pytest.raises(ValueError, match="corrupt|decompressed"):
        decompress(b"\x00\x01garbage-garbage", 4096, state)


def test_unknown_compression_format():
    with pytest.raises(ValueError, match="unknown compression format 7"):
        decompress(b"", 10, 7)


def test_reading_order_merges_cpus_by_first_timestamp():
    # file order: header, cpu0 [100..], cpu1 [50..], cpu0 [300..], cpu1 [200..]
    idx = BufferIndex(offset=np.arange(5), size=np.ones(5), filled=np.ones(5), cpu=np.array([0, 0, 1, 0, 1]),
                      seq=np.array([0, 1, 2, 3, 4], dtype=np.uint64), flags=np.zeros(5, dtype=np.int64),
                      state=np.zeros(5, dtype=np.int64), first_ts=np.array([0, 100, 50, 300, 200]))
    order, wm = reading_order(idx)
    assert order.tolist() == [2, 1, 4, 3]
    assert wm.tolist() == [100, 200, 300, np.iinfo(np.int64).max]
