#!/usr/bin/env bash
# Side-by-side data-loader benchmark: `cargo xtask bench loader` (fr's BatchLoader, rayon pool
# of THREADS threads) against benchmarks/python_loader.py (insightface's MXFaceDataset +
# DataLoader(num_workers=THREADS) work, OpenCV or PIL + numpy), on the same generated .rec of
# IMAGES 112x112 JPEG records: read, decode, random flip, normalise, batches of BATCH.
# Runs each REPEATS times, alternating, one process at a time; prints the Markdown table of
# benchmarks/README.md (median images/s, ratio fr / Python).
#
#   bash benchmarks/loader_compare.sh DATA_DIR          # DATA_DIR: where train.rec is generated
#   PYTHON=/path/to/venv/bin/python REPEATS=5 THREADS=2 bash benchmarks/loader_compare.sh DATA_DIR
#
# The Python side needs numpy and opencv-python-headless (DECODER=cv2, the default, as
# mx.image.imdecode uses OpenCV) or pillow (DECODER=pil).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 DATA_DIR" >&2
  exit 2
fi
DATA=$1
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
REPEATS=${REPEATS:-3}
THREADS=${THREADS:-2}
IMAGES=${IMAGES:-20000}
BATCH=${BATCH:-128}
EPOCHS=${EPOCHS:-3}
DECODER=${DECODER:-cv2}
export RAYON_NUM_THREADS=$THREADS

cargo build --release -p xtask >&2
# Generate the .rec once (a no-op when DATA already holds one).
target/release/xtask bench loader --data "$DATA" --images "$IMAGES" --batch "$BATCH" --steps 1 --warmup 0 >/dev/null

median() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
# images/s: the last column of the last table row on stdin
ips() { tail -1 | awk -F'|' '{gsub(/ /, "", $(NF - 1)); print $(NF - 1)}'; }

fr=() py=()
for _ in $(seq "$REPEATS"); do
  fr+=("$(target/release/xtask bench loader --data "$DATA" --batch "$BATCH" --steps "$EPOCHS" --warmup 1 | ips)")
  py+=("$("$PYTHON" benchmarks/python_loader.py "$DATA" --batch "$BATCH" --workers "$THREADS" \
    --epochs "$EPOCHS" --warmup 1 --decoder "$DECODER" | ips)")
done
fr_ips=$(printf '%s\n' "${fr[@]}" | median)
py_ips=$(printf '%s\n' "${py[@]}" | median)
ratio=$(awk -v a="$fr_ips" -v b="$py_ips" 'BEGIN {printf "%.2fx", a / b}')
n=$(head -c 200 "$DATA/property" 2>/dev/null | cut -d, -f1 || true)
echo "| images | batch | threads / workers | fr BatchLoader images/s | Python ($DECODER + numpy) images/s | fr / Python |"
echo "|---|---|---|---|---|---|"
echo "| $IMAGES ($n identities) | $BATCH | $THREADS | $fr_ips | $py_ips | $ratio |"
echo "runs: fr ${fr[*]}; Python ${py[*]}" >&2
