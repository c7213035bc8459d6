"""bench/attention_modes.py's memory column and report table, on made-up rows: the KV bytes each
mode keeps after n positions, and the table's ratios and slope."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import attention_modes  # noqa: E402

PER_POSITION = attention_modes.KV_BYTES


@pytest.mark.parametrize("mode, length, want", [
    ("dense", 4096, 4096 * PER_POSITION),
    ("block_sparse:64", 4096, 4096 * PER_POSITION),                 # decode keeps every key
    ("window 256+4", 100, 100 * PER_POSITION),
    ("window 256+4", 8192, 260 * PER_POSITION),                     # the ring, however long
    ("per_head:256", 8192, int((0.75 * 8192 + 0.25 * 260) * PER_POSITION))])
def test_kv_bytes_follow_what_each_mode_keeps(mode, length, want):
    measured = {"per_head:256": [[1, 0, 0, 0], [0, 1, 0, 0]]}    # a quarter of the heads stream
    assert attention_modes.kv_bytes(mode, length, measured) == want


def test_linear_keeps_a_state_and_its_window():
    state = attention_modes.kv_bytes("linear:elu", 8192, {})
    assert state == attention_modes.kv_bytes("linear:elu", 256, {}) > 0
    assert attention_modes.kv_bytes("linear:elu,window:64", 8192, {}) == state + 64 * PER_POSITION


def test_the_table_gives_ratios_to_dense_and_the_slope():
    rows = [{"mode": m, "length": n, "ms": ms, "kv_MB": 1.0}
            for m, times in (("dense", (1.0, 4.0)), ("fast", (1.0, 2.0)))
            for n, ms in zip((256, 512), times)]
    lines = attention_modes.table(rows).splitlines()
    assert lines[3].startswith("| fast | 1.0 (1.0x), 1 | 2.0 (2.0x), 1 | 1.00 |")
    assert lines[2].endswith("| 2.00 |")
