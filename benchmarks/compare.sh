#!/usr/bin/env bash
# Side-by-side IResNet CPU benchmark: `cargo xtask bench` (fr) against
# benchmarks/pytorch_iresnet.py (PyTorch), the same model, batch, step and thread count,
# each configuration run REPEATS times in its own process, one process at a time; prints the
# Markdown table of benchmarks/README.md (median images/s and median peak RSS, ratio fr/PyTorch).
#
#   bash benchmarks/compare.sh                 # needs python3 with torch for the PyTorch column
#   REPEATS=5 THREADS=2 PYTHON=python3 bash benchmarks/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
REPEATS=${REPEATS:-3}
THREADS=${THREADS:-2}
export RAYON_NUM_THREADS=$THREADS

cargo build --release -p xtask >&2
have_torch=0
"$PYTHON" -c "import torch" 2>/dev/null && have_torch=1

# mode model batch steps (after WARMUP untimed steps, so both peers are timed in steady state)
WARMUP=${WARMUP:-2}
CASES=(
  "train default 64 30"
  "infer default 64 30"
  "train r18 32 4"
  "infer r18 32 6"
  "train r50 32 4"
  "infer r50 32 4"
)

median() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
# column $1 of the last table row on stdin (1 = model ... 6 = images/s, 7 = peak RSS)
column() { tail -1 | awk -F'|' -v c="$(($1 + 1))" '{gsub(/ /, "", $c); print $c}'; }

# run CMD... REPEATS times; print "median_ips median_rss"
measure() {
  local ips=() rss=() row
  for _ in $(seq "$REPEATS"); do
    row=$("$@" | tail -1)
    ips+=("$(column 6 <<< "$row")")
    rss+=("$(column 7 <<< "$row")")
  done
  echo "$(printf '%s\n' "${ips[@]}" | median) $(printf '%s\n' "${rss[@]}" | median)"
}

echo "| model | mode | batch | fr images/s | PyTorch images/s | fr / PyTorch | fr peak RSS (MiB) | PyTorch peak RSS (MiB) |"
echo "|---|---|---|---|---|---|---|---|"
for case in "${CASES[@]}"; do
  read -r mode model batch steps <<< "$case"
  read -r fr_ips fr_rss <<< "$(measure target/release/xtask bench "$mode" --model "$model" --batch "$batch" --steps "$steps" --warmup "$WARMUP")"
  if [ "$have_torch" = 1 ]; then
    read -r pt_ips pt_rss <<< "$(measure "$PYTHON" benchmarks/pytorch_iresnet.py "$mode" --model "$model" --batch "$batch" --steps "$steps" --warmup "$WARMUP" --threads "$THREADS")"
    ratio=$(awk -v a="$fr_ips" -v b="$pt_ips" 'BEGIN {printf "%.2fx", a / b}')
  else
    pt_ips="–"; pt_rss="–"; ratio="–"
  fi
  echo "| $model | $mode | $batch | $fr_ips | $pt_ips | $ratio | $fr_rss | $pt_rss |"
done
