#!/usr/bin/env bash
# Map and score one or more checkpoints over a tile list; one summary.csv row per checkpoint.
# All the work is done by test.py and mIoU.py (mapping/ and scoring/); this script only loops. See docs/mapping.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: auto_test.sh [options] CHECKPOINT_OR_FOLDER [...]

Maps the tiles of a list with each checkpoint (test.py), scores the maps against the list's
HR references (mIoU.py) and writes OUT/summary.csv with one row per checkpoint: OA, mIoU,
FWIoU, kappa, per-class IoU and the legacy (published) figures. A folder stands for all
*.pth files in it, in version order (epoch_2 before epoch_10). Stops at the first failure.

For checkpoint NAME.pth the outputs are:
  OUT/NAME/              class maps (and previews, probabilities if asked)
  OUT/NAME/metrics.json  all figures (mIoU.py --json)
  OUT/summary.csv        rewritten on every run

Options:
  --list_dir CSV     tile list with image_fn and hr_label_fn (default: the dataset's list)
  --dataset NAME     dataset definition (default: the checkpoint's own)
  --list_root R      csv or repo: how relative paths in the list resolve (default: test.py's rule)
  --out_dir DIR      output folder (default: auto_test_results)
  --device D         auto, cpu or cuda (default: auto)
  --gpu N            CUDA device index (default: 0)
  --batch_size N     chips per forward pass (default: 16)
  --chip_size N      sliding-window chip (default: 224)
  --stride N         sliding-window stride (default: 112)
  --image_nodata V   auto, none or a value: image pixels that are no data (default: auto, the tile's own)
  --amp              bfloat16 autocast on CUDA
  --overwrite        re-map tiles whose maps exist (default: keep them, so a rerun resumes)
  --preview          also write a preview PNG per tile
  --python PY        Python interpreter (default: $PYTHON, else python)
  -h, --help         this help

Example:
  ./auto_test.sh --list_dir dataset/CSV_list/Chesapeake_NewYork_eval.csv --out_dir results runs/vcnet/
EOF
}

die() {
    echo "auto_test.sh: error: $*" >&2
    exit 2
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
OUT="auto_test_results"
LIST=()
MAP_ARGS=()
SCORE_ARGS=()
CHECKPOINTS=()

need_value() {
    [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --list_dir) need_value "$@"; LIST=(--list_dir "$2"); shift 2 ;;
        --dataset|--list_root) need_value "$@"; MAP_ARGS+=("$1" "$2"); SCORE_ARGS+=("$1" "$2"); shift 2 ;;
        --device|--gpu|--batch_size|--chip_size|--stride|--image_nodata) need_value "$@"; MAP_ARGS+=("$1" "$2"); shift 2 ;;
        --amp|--overwrite|--preview) MAP_ARGS+=("$1"); shift ;;
        --out_dir) need_value "$@"; OUT="$2"; shift 2 ;;
        --python) need_value "$@"; PY="$2"; shift 2 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            if [[ -d "$1" ]]; then
                mapfile -t found < <(find "$1" -maxdepth 1 -name '*.pth' -type f | sort -V)
                [[ ${#found[@]} -gt 0 ]] || die "$1: no *.pth checkpoint in this folder"
                CHECKPOINTS+=("${found[@]}")
            elif [[ -f "$1" ]]; then
                CHECKPOINTS+=("$1")
            else
                die "$1: checkpoint not found"
            fi
            shift ;;
    esac
done

[[ ${#CHECKPOINTS[@]} -gt 0 ]] || { usage >&2; die "give at least one checkpoint or folder"; }

[[ ! -e "$OUT" || -d "$OUT" ]] || die "--out_dir $OUT: is a file, not a folder"
mkdir -p "$OUT" 2>/dev/null && [[ -w "$OUT" ]] || die "--out_dir $OUT: cannot write in this folder"
SUMMARY="$OUT/summary.csv"
rm -f "$SUMMARY"

for ckpt in "${CHECKPOINTS[@]}"; do
    name="$(basename "$ckpt" .pth)"
    dir="$OUT/$name"
    echo "== $ckpt -> $dir"
    "$PY" "$HERE/test.py" --checkpoint "$ckpt" --out_dir "$dir" "${LIST[@]}" "${MAP_ARGS[@]}" \
        || die "mapping with $ckpt failed (test.py exit $?); outputs so far are in $dir"
    "$PY" "$HERE/mIoU.py" --pred_dir "$dir" "${LIST[@]}" "${SCORE_ARGS[@]}" --json "$dir/metrics.json" \
        --summary_csv "$SUMMARY" --label "$name" \
        || die "scoring $dir failed (mIoU.py exit $?)"
done

echo "summary of ${#CHECKPOINTS[@]} checkpoint(s): $SUMMARY"
