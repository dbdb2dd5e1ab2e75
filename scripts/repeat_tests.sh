#!/usr/bin/env bash
# Runs the README's test command (`make test`) N times, each on a fresh clone of HEAD (its own
# .venv, installed from scratch by `make test` as CI does), and reports pass/fail counts per run.
#
#   scripts/repeat_tests.sh N            # e.g. 5; the last run is in shuffled order
#   SHUFFLE=all scripts/repeat_tests.sh 3
#
# Environment:
#   SHUFFLE   last (default: the last run shuffled) | all | none. A shuffled run shuffles the
#             modules and the tests inside each module (pytest-random-order, bucket "module";
#             module-scoped fixtures stay shared) with a printed seed: replay one with
#             PYTEST_ADDOPTS="--random-order-bucket=module --random-order-seed=SEED" make test.
#   WORK      where the clones and logs go (default: a new temp dir, kept for reading the logs).
#   PYTHON    the interpreter `make test` builds .venv with (default python3).
# Only committed work is tested (HEAD, not the working tree). Each run also gets its own
# PYTHONHASHSEED, so set/dict-order dependence shows up too.
set -euo pipefail
N=${1:?usage: scripts/repeat_tests.sh N}
SHUFFLE=${SHUFFLE:-last}
SRC=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
HEAD=$(git -C "$SRC" rev-parse HEAD)
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/repeat_tests.XXXXXX")}
mkdir -p "$WORK"
echo "repeat_tests: $N run(s) of 'make test' on fresh clones of $HEAD; logs in $WORK"

results=()
failed_runs=0
for i in $(seq 1 "$N"); do
  dir="$WORK/run$i"
  log="$WORK/run$i.log"
  rm -rf "$dir"
  git clone -q --no-hardlinks "$SRC" "$dir"
  git -C "$dir" checkout -q "$HEAD"
  order="fixed"
  addopts=""
  if [ "$SHUFFLE" = all ] || { [ "$SHUFFLE" = last ] && [ "$i" -eq "$N" ]; }; then
    seed=$(( (RANDOM << 15) | RANDOM ))
    order="shuffled(seed=$seed)"
    addopts="--random-order-bucket=module --random-order-seed=$seed"
  fi
  hashseed=$(( RANDOM % 4096 ))
  start=$(date +%s)
  set +e
  (cd "$dir" && PYTEST_ADDOPTS="$addopts" PYTHONHASHSEED=$hashseed make test) >"$log" 2>&1
  rc=$?
  set -e
  secs=$(( $(date +%s) - start ))
  # pytest's closing line, e.g. "=== 336 passed, 2 warnings in 187.21s (0:03:07) ==="
  summary=$(grep -E '^=+ .*(passed|failed|error).* in [0-9.]+s' "$log" | tail -1 | tr -d '=' \
    | sed 's/^ *//;s/ *$//')
  [ "$rc" -eq 0 ] || failed_runs=$((failed_runs + 1))
  line="run $i: rc=$rc order=$order PYTHONHASHSEED=$hashseed ${secs}s: ${summary:-no pytest summary (see $log)}"
  results+=("$line")
  echo "$line"
  if [ "$rc" -ne 0 ]; then
    grep -E '^(FAILED|ERROR) ' "$log" | head -20 || true
  fi
  # keep the log, drop the clone and its .venv (GBs)
  rm -rf "$dir"
done

echo "---- summary: $((N - failed_runs)) of $N runs green ----"
printf '%s\n' "${results[@]}"
[ "$failed_runs" -eq 0 ]
