#!/usr/bin/env bash
# On a CUDA machine: every test file with tests a CPU skips for lack of CUDA (they ask torch.cuda.is_available()
# or device_count()), plus the script, reliability and speed-layer tests; one pytest per file, then a summary.
#
#   bash bench/gpu_tests.sh        # from a checkout with its venv active (pip install -e '.[test]')
#
# Logs go to $OUT/gpu_tests (or out/gpu_tests). Exit status 1 if any file failed or no CUDA device is seen.
set -u
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to test')" || exit 1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())"
logs="${OUT:-out}/gpu_tests"
mkdir -p "$logs"
files=$( (grep -l -e "cuda.is_available" -e "cuda.device_count" tests/test_*.py
          ls tests/test_scripts.py tests/test_reliability*.py tests/test_fast.py) | sort -u)
status=0
summary=""
for f in $files; do
    log="$logs/$(basename "$f" .py).log"
    start=$SECONDS
    python -m pytest -p no:cacheprovider -rsfE "$f" > "$log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    summary+=$(printf "%-34s rc=%-2d %4ds  %s" "$f" "$rc" $((SECONDS - start)) "$(tail -n 1 "$log")")$'\n'
done
echo
echo "== summary (logs in $logs)"
printf "%s" "$summary"
echo "== skips naming CUDA or GPUs (expected none, except 2-GPU tests on a 1-GPU machine):"
grep -h "^SKIPPED.*\(CUDA\|GPU\)" "$logs"/*.log || echo "none"
echo "== failures:"
grep -h "^\(FAILED\|ERROR\) " "$logs"/*.log || echo "none"
exit $status
