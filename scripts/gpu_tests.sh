#!/usr/bin/env bash
# The GPU suite on the lent H100, one process per test file (a kernel fault poisons the
# CUDA context of its process, so files must not share one). Logs: ${OUT:-out}/gpu_tests.log;
# GPU_TEST_TIMEOUT (s, default 150) bounds each file; GPU_TEST_JOBS (default 1) files run at once
# (the card has room for several; the summary keeps the files' order).
#   source scripts/gpu_env.sh && scripts/gpu_tests.sh [files...]
out=${OUT:-out}
mkdir -p "$out/per-file"
files=("$@")
[ ${#files[@]} -gt 0 ] || files=($(grep -l "mark.gpu" tests/test_*.py))
run_one() {
  local name
  name=$(basename "$1" .py)
  local start=$SECONDS
  timeout "${GPU_TEST_TIMEOUT:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short "$1" \
    > "$out/per-file/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "(killed at the ${GPU_TEST_TIMEOUT:-150} s limit)" >> "$out/per-file/$name.log"
  echo "($((SECONDS - start)) s)" >> "$out/per-file/$name.log"
}
running=0
for f in "${files[@]}"; do
  run_one "$f" &
  running=$((running + 1))
  if [ "$running" -ge "${GPU_TEST_JOBS:-1}" ]; then wait -n; running=$((running - 1)); fi
done
wait
summary=""
for f in "${files[@]}"; do
  name=$(basename "$f" .py)
  { echo "===== $name"; cat "$out/per-file/$name.log"; } >> "$out/gpu_tests.log"
  last=$(grep -E "passed|failed|skipped|error|no tests ran|killed" "$out/per-file/$name.log" | tail -n 1)
  summary+="$(printf '%-28s %s %s' "$name" "${last:-$(tail -n 2 "$out/per-file/$name.log" | head -n 1)}" "$(tail -n 1 "$out/per-file/$name.log")")"$'\n'
done
printf '%s' "$summary"
