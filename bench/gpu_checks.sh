#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run, in order of what they tell (each under its own time limit, so
# a slow step cannot take the later ones with it):
#   1. the kernel, attention and loader tests on each device (`pytest -k each_device`);
#   2. the whole book on a Gemma-2-2B-width stand-in (bench_book.py; per chapter wall, CPU, peak RSS and GPU);
#   3. the kernel benchmarks on the GPU (bench/run.py --device cuda).
# Usage: bash bench/gpu_checks.sh OUTDIR   (results and logs go there; the repository's bench/results is
# left alone). Limits in seconds: GPU_TESTS_S, GPU_BOOK_S, GPU_BENCH_S; GPU_BOOK_LAYERS (default 2);
# GPU_STEPS (default "tests book bench", run in the order given) and GPU_BOOK_CHAPTERS (e.g. "04 05";
# default all) split the checks over several calls where one call's time is short. The first GPU run of a
# fused kernel compiles it (torch.compile, tens of seconds), which the tests' limit allows for.
# Needs WEIGHTSCOPE_MODELS / WEIGHTSCOPE_CORPORA as for the tests, and ../shared/tokenizers/gpt2 for the
# stand-ins. Exit status: the number of steps that failed.
#
# On a GPU machine without internet: `python bench/gpu_kit.py` here first packs `.gpu/` (the wheels of the
# packages that machine's Python lacks, and the offline inputs); with it copied there, this script installs
# the wheels into a folder of its own (only where the packages are missing) and reads the inputs from it.
# GPU_WORK (default $TMPDIR/weightscope-gpu-work; -L<layers> is appended) keeps the stand-in and the chapters'
# tables between calls on the same machine (bench_book.py --work): a second call skips the build, and its
# chapters can read the tables of the first's (chapter 7 reads those of 1-3); with GPU_BOOK_CHAPTERS set, the
# book's results, log and chapter logs are named for those chapters, so two calls keep both. GPU_ARCHIVE=FILE
# packs OUTDIR into one .tgz however the run ends, for a machine that returns few files.
set -u
out=$(realpath -m "${1:?usage: bash bench/gpu_checks.sh OUTDIR}")  # absolute: the script changes folder
mkdir -p "$out"
if [ -n "${GPU_ARCHIVE:-}" ]; then  # first, so that every exit below leaves the archive
    archive=$(realpath -m "$GPU_ARCHIVE")
    mkdir -p "$(dirname "$archive")"
    trap 'tar czf "$archive" -C "$(dirname "$out")" "$(basename "$out")"' EXIT
fi
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
tmp=${TMPDIR:-/tmp}
export PYTHONUNBUFFERED=1 WEIGHTSCOPE_PROGRESS=0 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}"  # the library without an install
if [ -d .gpu/wheels ] && ! $py -c "import sae_lens, transformer_lens, papermill, jupytext, plotly" 2>/dev/null
then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$tmp/weightscope-site" .gpu/wheels/*.whl || { echo "wheels not installed"; exit 99; }
    export PYTHONPATH="$PYTHONPATH:$tmp/weightscope-site"  # holds only what the machine lacks
fi
[ -d .gpu/shared/models ] && export WEIGHTSCOPE_MODELS=${WEIGHTSCOPE_MODELS:-$PWD/.gpu/shared/models}
[ -d .gpu/shared/corpora ] && export WEIGHTSCOPE_CORPORA=${WEIGHTSCOPE_CORPORA:-$PWD/.gpu/shared/corpora}
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
layers=${GPU_BOOK_LAYERS:-2}
for name in ${GPU_STEPS:-tests book bench}; do  # in the order given
    case $name in
    tests)
        # only the files that hold such tests: collecting every file would import what the machine may lack
        # shellcheck disable=SC2046
        step tests "${GPU_TESTS_S:-240}" $py -m pytest -p no:cacheprovider -q -k each_device \
            $(grep -l "def test_.*each_device" tests/test_*.py) ;;
    book)
        part=${GPU_BOOK_CHAPTERS:+-ch${GPU_BOOK_CHAPTERS// /-}}  # a call per part: files of their own
        # shellcheck disable=SC2086  # the chapter numbers are separate words
        step "book$part" "${GPU_BOOK_S:-330}" $py -u bench/bench_book.py --arch gemma2 --layers "$layers" \
            ${GPU_BOOK_CHAPTERS:+--chapters $GPU_BOOK_CHAPTERS} \
            --out "$out/book-cuda-$day-gemma2-L$layers$part.json" \
            --work "${GPU_WORK:-$tmp/weightscope-gpu-work}-L$layers" --logs "$out/chapters$part" ;;
    bench)
        step bench "${GPU_BENCH_S:-120}" $py -u bench/run.py --device cuda --quick \
            --out "$out/cuda-$day-quick.json" ;;
    *)
        echo "unknown step $name (GPU_STEPS takes tests, book, bench)"; failed=$((failed + 1)) ;;
    esac
done
echo "== gpu checks: $failed step(s) failed"
exit "$failed"
