"""The GPU check: one run that tests and times everything speed-related on a CUDA machine.

``tools/gpu_check.sh`` runs it. Stages, each a subprocess with its own time limit (the limits add
up to under 9 minutes), each writing ``<stage>.txt`` (its output) and, for the benchmarks,
``<stage>.json`` into the output folder; ``summary.json`` and ``summary.txt`` gather them:

1. ``device``: the GPU, torch and CUDA versions;
2. ``cuda_tests``: the tests marked ``cuda`` (CUDA parity at TF32 tolerance, CUDA loop reference,
   CUDA mapping agreement);
3. ``model_*``: the published-size model at 224, training (batch 16) and inference (batch 64), in
   float32, bfloat16 and the faster paths (channels-last with fused attention, the Triton
   deformable-attention kernel, CUDA graphs, torch.compile of the forward), with the agreement of
   each path with float32;
4. ``mapping_vcnet``: whole-tile mapping of a 10,000 x 10,000 4-band synthetic tile with the
   published-size model (chips/s and km2/s);
5. ``mapping_null``: the mapping pipeline's own ceiling (a model that costs nothing).

``--smoke`` runs the same stages on the CPU with the tiny model, small chips and a small tile
(without the test stage and ``torch.compile``, whose C++ build takes minutes on a small CPU), in
about a minute: it checks the script, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The published model's measured throughput on one H100 (issue 10), chips/s, for the ratios.
PUBLISHED_H100 = {"train_fp32": 48.3, "train_bf16": 56.0, "forward_fp32": 141.8, "forward_bf16": 175.4}


#: Time limit of every stage in --smoke mode.
SMOKE_TIMEOUT_S = 180


@dataclass
class Stage:
    name: str
    argv: list[str]
    timeout_s: int
    json: bool = True
    env: dict[str, str] = field(default_factory=dict)


def _model_stage(name: str, flags: list[str], timeout_s: int, smoke: bool) -> Stage:
    sizes = (["--config", "tiny", "--chip_size", "64", "--batch_size", "2", "--forward_batch_size", "2",
              "--device", "cpu", "--repeats", "1", "--warmup", "1"] if smoke else
             ["--config", "vcnet", "--chip_size", "224", "--batch_size", "16", "--forward_batch_size", "64",
              "--device", "cuda", "--repeats", "8", "--warmup", "2"])
    return Stage(name, ["tools/benchmark.py", "model", *sizes, "--agreement", *flags], timeout_s)


def stages(smoke: bool) -> list[Stage]:
    device_probe = ("import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
                    "'python', platform.python_version()); print('cuda available', torch.cuda.is_available()); "
                    "[print(f'device {i}:', torch.cuda.get_device_name(i), "
                    "round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1), 'GiB') "
                    "for i in range(torch.cuda.device_count())]")
    plan = [Stage("device", ["-c", device_probe], 20, json=False)]
    if not smoke:
        plan.append(Stage("cuda_tests", ["-m", "pytest", "-q", "-m", "cuda", "-rs", "-s", "tests"], 80, json=False))
    plan += [
        _model_stage("model_fp32", [], 45, smoke),
        _model_stage("model_bf16", ["--amp"], 40, smoke),
        _model_stage("model_bf16_channels_last_sdpa", ["--amp", "--channels_last", "--fused_attention"], 40, smoke),
        # The Triton kernel is inference only (training falls back to the reference): forward alone.
        _model_stage("model_bf16_triton_deform_attn", ["--amp", "--channels_last", "--fused_attention",
                                                       "--triton_deform_attn", "--no_train"], 35, smoke),
        _model_stage("model_bf16_cuda_graphs", ["--amp", "--channels_last", "--fused_attention", "--cuda_graphs",
                                                "--no_train"], 35, smoke),
        # Compiling the backward as well would not fit the time limit.
        _model_stage("model_bf16_compile", ["--amp", "--channels_last", "--fused_attention", "--compile",
                                            "--no_train"], 100, smoke),
    ]
    mapping = (["--size", "600", "--chip_size", "64", "--stride", "32", "--batch_size", "8", "--device", "cpu"]
               if smoke else ["--size", "10000", "--device", "cuda", "--batch_size", "64"])
    plan += [
        Stage("mapping_vcnet", ["tools/benchmark.py", "mapping", "--model", "tiny" if smoke else "vcnet",
                                *mapping, *([] if smoke else ["--amp"])], 90),
        Stage("mapping_null", ["tools/benchmark.py", "mapping", "--model", "null", *mapping, "--repeats", "2"], 45),
    ]
    if smoke:  # a shared CPU is slow to start Python and torch; the limits are for the GPU run
        # Inductor's C++ build of even the tiny model takes minutes on 2 cores: not part of the smoke run.
        plan = [stage for stage in plan if "--compile" not in stage.argv]
        for stage in plan:
            stage.timeout_s = SMOKE_TIMEOUT_S
    return plan


def run_stage(stage: Stage, out_dir: str) -> dict:
    """Run one stage; its output goes to ``<name>.txt``. Returns its record for the summary."""
    json_path = os.path.join(out_dir, f"{stage.name}.json")
    argv = [sys.executable, *stage.argv, *(["--json", json_path] if stage.json else [])]
    record: dict = {"stage": stage.name, "command": " ".join(argv[1:]), "timeout_s": stage.timeout_s}
    start = time.perf_counter()
    with open(os.path.join(out_dir, f"{stage.name}.txt"), "w", encoding="utf-8") as log:
        try:
            code = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=stage.timeout_s,
                                  env={**os.environ, **stage.env}).returncode
            record["status"] = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            record["status"] = "timeout"
    record["seconds"] = round(time.perf_counter() - start, 1)
    if stage.json and os.path.isfile(json_path):
        with open(json_path, encoding="utf-8") as fh:
            record["result"] = json.load(fh)
    return record


def _summary_lines(records: list[dict]) -> list[str]:
    lines = []
    for record in records:
        lines.append(f"{record['stage']:<32} {record['status']:<8} {record['seconds']:>6.1f} s")
        result = record.get("result") or {}
        picked = {k: result[k] for k in ("forward_chips_per_s", "train_chips_per_s", "class_agreement",
                                         "max_abs_diff_vit", "first_forward_s", "peak_gpu_mib") if k in result}
        amp = "bf16" if result.get("amp_bf16") else "fp32"
        if "forward_chips_per_s" in picked:
            picked["forward_x_published"] = round(picked["forward_chips_per_s"] / PUBLISHED_H100[f"forward_{amp}"], 2)
        if "train_chips_per_s" in picked:
            picked["train_x_published"] = round(picked["train_chips_per_s"] / PUBLISHED_H100[f"train_{amp}"], 2)
        for row in result.get("results", []):
            picked[f"{row['size']}px"] = f"{row['chips_per_s']} chips/s, {row['km2_per_s']} km2/s"
        if picked:
            lines.append("    " + ", ".join(f"{k} {v}" for k, v in picked.items()))
    return lines


def _mapping_share(records: list[dict]) -> float | None:
    """Whole-tile mapping chips/s over the model-only bfloat16 forward (the target is 0.8 or more)."""
    by_name = {r["stage"]: r.get("result") or {} for r in records}
    forward = by_name.get("model_bf16", {}).get("forward_chips_per_s")
    mapped = by_name.get("mapping_vcnet", {}).get("results")
    return round(mapped[0]["chips_per_s"] / forward, 3) if forward and mapped else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default=os.environ.get("OUT") or "gpu_check",
                        help="output folder (default: $OUT, else ./gpu_check)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    plan = stages(args.smoke)
    print(f"gpu_check: {len(plan)} stages, at most {sum(s.timeout_s for s in plan)} s, output in {args.out_dir}",
          flush=True)
    records = []
    for stage in plan:
        record = run_stage(stage, args.out_dir)
        records.append(record)
        print("\n".join(_summary_lines([record])), flush=True)
        if stage.name == "device":
            with open(os.path.join(args.out_dir, "device.txt"), encoding="utf-8") as fh:
                print(fh.read().rstrip(), flush=True)
    share = _mapping_share(records)
    lines = _summary_lines(records) + ([f"whole-tile mapping / model-only forward (bf16): {share}"] if share else [])
    print(lines[-1] if share else "", flush=True)
    with open(os.path.join(args.out_dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump({"smoke": args.smoke, "published_h100_chips_per_s": PUBLISHED_H100, "stages": records,
                   "mapping_over_model_forward": share}, fh, indent=2)
    with open(os.path.join(args.out_dir, "summary.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
