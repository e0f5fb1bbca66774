"""tools/gpu_check.py: the GPU plan fits its time budget, and the smoke mode runs end to end on the CPU."""

from __future__ import annotations

import json

from tools import gpu_check


def test_gpu_plan_fits_nine_minutes_and_covers_every_path():
    plan = gpu_check.stages(smoke=False)
    assert sum(stage.timeout_s for stage in plan) <= 9 * 60
    names = [stage.name for stage in plan]
    assert names[:2] == ["device", "cuda_tests"] and {"mapping_vcnet", "mapping_null"} <= set(names)
    models = [stage for stage in plan if stage.name.startswith("model_")]
    assert {"model_fp32", "model_bf16", "model_bf16_triton_deform_attn"} <= {stage.name for stage in models}
    for stage in models:
        assert "--agreement" in stage.argv and stage.argv[stage.argv.index("--device") + 1] == "cuda"
    tile = next(stage for stage in plan if stage.name == "mapping_vcnet").argv
    assert tile[tile.index("--size") + 1] == "10000" and "vcnet" in tile
    assert [s.name for s in gpu_check.stages(smoke=True)] == [
        n for n in names if n not in ("cuda_tests", "model_bf16_compile")]
    records = [{"stage": "model_bf16", "result": {"forward_chips_per_s": 200.0}},
               {"stage": "mapping_vcnet", "result": {"results": [{"chips_per_s": 170.0}]}}]
    assert gpu_check._mapping_share(records) == 0.85  # whole-tile mapping / model-only forward


def test_smoke_stages_run_and_are_summarised(tmp_path, monkeypatch):
    """Three of the smoke stages (the rest are the same commands with other flags), through main()."""
    keep = {"device", "model_bf16_cuda_graphs", "mapping_null"}
    smoke = [stage for stage in gpu_check.stages(smoke=True) if stage.name in keep]
    monkeypatch.setattr(gpu_check, "stages", lambda smoke_mode: smoke)
    assert gpu_check.main(["--smoke", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    records = {record["stage"]: record for record in summary["stages"]}
    assert set(records) == keep and all(r["status"] == "ok" for r in records.values())
    assert "cuda available False" in (tmp_path / "device.txt").read_text()
    model = records["model_bf16_cuda_graphs"]["result"]
    assert model["forward_chips_per_s"] > 0 and 0 <= model["class_agreement"] <= 1 and "train_chips_per_s" not in model
    assert records["mapping_null"]["result"]["results"][0]["km2_per_s"] > 0
    text = (tmp_path / "summary.txt").read_text()
    assert "mapping_null" in text and "km2/s" in text
