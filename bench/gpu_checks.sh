#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run, in order of what they tell (each under its own time limit, so
# a slow step cannot take the later ones with it):
#   1. the kernel, attention and loader tests on each device (`pytest -k each_device`);
#   2. the whole book on a Gemma-2-2B-width stand-in (bench_book.py; per chapter wall, CPU, peak RSS and GPU);
#   3. the kernel benchmarks on the GPU (bench/run.py --device cuda).
# Usage: bash bench/gpu_checks.sh OUTDIR   (results and logs go there; the repository's bench/results is
# left alone). Limits in seconds: GPU_TESTS_S, GPU_BOOK_S, GPU_BENCH_S; GPU_BOOK_LAYERS (default 2);
# GPU_STEPS (default "tests book bench") and GPU_BOOK_CHAPTERS (e.g. "04 05"; default all) split the checks
# over several calls where one call's time is short. The first GPU run of a fused kernel compiles it
# (torch.compile, tens of seconds), which the tests' limit allows for.
# Needs WEIGHTSCOPE_MODELS / WEIGHTSCOPE_CORPORA as for the tests, and ../shared/tokenizers/gpt2 for the
# stand-ins. Exit status: the number of steps that failed.
set -u
out=${1:?usage: bash bench/gpu_checks.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WEIGHTSCOPE_PROGRESS=0 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}"  # the library without an install
failed=0
step() {  # step NAME LIMIT_S COMMAND...: runs COMMAND under the limit, its output to OUTDIR/NAME.log
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit} s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: rc $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
day=$(date +%F)
steps=" ${GPU_STEPS:-tests book bench} "
layers=${GPU_BOOK_LAYERS:-2}
if [[ $steps == *" tests "* ]]; then
    # only the files that hold such tests: collecting every file would import what the GPU machine may lack
    # shellcheck disable=SC2046
    step tests "${GPU_TESTS_S:-240}" $py -m pytest -p no:cacheprovider -q -k each_device \
        $(grep -l "def test_.*each_device" tests/test_*.py)
fi
if [[ $steps == *" book "* ]]; then
    # shellcheck disable=SC2086  # the chapter numbers are separate words
    step book "${GPU_BOOK_S:-330}" $py -u bench/bench_book.py --arch gemma2 --layers "$layers" \
        ${GPU_BOOK_CHAPTERS:+--chapters $GPU_BOOK_CHAPTERS} --out "$out/book-cuda-$day-gemma2-L$layers.json" \
        --tmp "${TMPDIR:-/tmp}" --logs "$out/chapters"
fi
if [[ $steps == *" bench "* ]]; then
    step bench "${GPU_BENCH_S:-120}" $py -u bench/run.py --device cuda --quick --out "$out/cuda-$day-quick.json"
fi
echo "== gpu checks: $failed step(s) failed"
exit "$failed"
