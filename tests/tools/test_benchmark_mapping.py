"""tools/benchmark.py mapping: the label model's vote is measured as --recipe robust's maps run it."""

from __future__ import annotations

import json

from tools import benchmark


def test_mapping_benchmark_runs_the_label_model_s_vote(tmp_path):
    out = tmp_path / "vote.json"
    assert benchmark.main(["mapping", "--model", "tiny", "--size", "96", "--chip_size", "64", "--stride", "32",
                           "--label_model_weight", "1", "--guided_filter", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["label_model_weight"], result["guided_filter"]) == (1.0, 2)
    assert result["results"][0]["chips_per_s"] > 0
