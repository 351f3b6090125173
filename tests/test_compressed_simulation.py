"""A real Flower simulation with compressed uploads: int8 deltas + top-k with error feedback."""
from __future__ import annotations

import json

from test_simulation import TEST_ROWS, assert_learned, fedseek


def test_int8_topk_simulation_trains_and_uploads_far_fewer_bytes(tmp_path):
    proc = fedseek("simulate", "--task", "banking77", "--institutions", "3", "--rounds", "3",
                   "--local-steps", "6", "--max-train-rows", "2400", "--max-test-rows", TEST_ROWS, "--epsilon", "8",
                   "--compression", "int8", "--topk", "0.25", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["compression.codec"] == "int8" and report["config"]["compression.topk"] == 0.25
    float32_bytes = 4 * report["trainable_params"] * 3  # what three float32 uploads would weigh
    for row in report["rounds"]:  # true encoded bytes: int8 values of 25 % + a 1-bit mask + scales
        assert float32_bytes / 12 < row["bytes_up"] < float32_bytes / 8, row
    # decoding + averaging deltas on the server still trains the global adapter
    assert_learned(report, TEST_ROWS)
    assert all(0 < e <= 8.0 + 1e-3 for e in report["epsilon"].values())
