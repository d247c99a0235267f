#!/usr/bin/env bash
# The GPU suite on the lent H100, one process per test file (a kernel fault poisons the
# CUDA context of its process, so files must not share one). Logs: ${OUT:-out}/gpu_tests.log;
# GPU_TEST_TIMEOUT (s, default 150) bounds each file.
#   source scripts/gpu_env.sh && scripts/gpu_tests.sh [files...]
out=${OUT:-out}
mkdir -p "$out"
files=("$@")
[ ${#files[@]} -gt 0 ] || files=($(grep -l "mark.gpu" tests/test_*.py))
summary=""
for f in "${files[@]}"; do
  name=$(basename "$f" .py)
  timeout "${GPU_TEST_TIMEOUT:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short "$f" > "$out/current.log" 2>&1
  { echo "===== $name"; cat "$out/current.log"; } >> "$out/gpu_tests.log"
  summary+="$(printf '%-28s %s' "$name" "$(tail -n 1 "$out/current.log")")"$'\n'
done
rm -f "$out/current.log"
printf '%s' "$summary"
