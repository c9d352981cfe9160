#!/bin/bash
# The GPU checks, as one bounded script for a borrowed GPU machine that has PyTorch but no network.
#
#   bash benchmarks/gpu_check.sh prep            # here, with network to PyPI: fill .gpu/ (git-ignored)
#   bash benchmarks/gpu_check.sh run [SECONDS]   # there, from the repository root, with .gpu/ beside it
#
# prep puts into .gpu/: wheels (Python 3.12, manylinux x86_64) of the lock's transformers, gguf and regex
# (the machine's own torch, numpy, safetensors, tokenizers and huggingface_hub are used), the bundled
# SmolLM2's tokenizer files and ../shared/data (about 22 MB in all; the 94 MB SmolLM2 GGUF does not fit in
# one 64 MiB transfer, so the checks below need no SmolLM2 weights).
#
# Carry .gpu on the device call (it is git-ignored). run does, each step bounded so that the whole ends
# within SECONDS (default 560), and writes what it finished into $OUT (or ./gpu-check-out):
#   1. env.txt: GPU, driver, Python, torch, transformers;
#   2. tests.txt: the fast suite (`-m "not slow"`) on CUDA (the library's automatic device), 8 xdist workers
#      of 2 threads each, every failure's traceback. (The first run, 2026-12-04 on an H200, used 15 workers of
#      16 threads and pytest-timeout's 60 s: 11 tests failed, all of them CPU-pinned or subprocess tests, and
#      the run was stopped before pytest printed why; thrashed cores timing them out is the likely cause.)
#      A failure here that is not a timeout: rerun it alone with `-p no:xdist` for its traceback;
#   3. scale.log / scale.json: benchmarks/scale.py on Llama-3.1-8B shapes at 8 and 32 layers, as far as
#      the time left allows (8 layers: about 2.5 min; 32: about 10 min on an H200).
# Results of the runs so far: docs/scale.md and docs/results.md, "On a GPU".
set -u
mode=${1:-run}
if [ "$mode" = prep ]; then
    mkdir -p .gpu/whl .gpu/tok
    pins=$(grep -E '^(transformers|gguf|regex)==' requirements/lock.txt | tr '\n' ' ')
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/whl $pins || exit 2
    find_tok='from svdkit.sources.models import smollm2_folder; print(smollm2_folder(progress=False))'
    tok=$("${PYTHON:-.venv/bin/python}" -c "$find_tok") || exit 2
    cp "$tok"/tokenizer* "$tok"/special_tokens_map.json .gpu/tok/ 2>/dev/null
    cp -r ../shared/data .gpu/data || exit 2
    du -sh .gpu
    exit 0
fi
[ "$mode" = run ] || { echo "usage: $0 prep | run [SECONDS]" >&2; exit 2; }
deadline=$(($(date +%s) + ${2:-560}))
left() { echo $((deadline - $(date +%s))); }
out=${OUT:-gpu-check-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    >"$out/env.txt" 2>&1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
    date
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nproc
    python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)'
    git log -1 --format='svdkit %h %s' 2>/dev/null
} >>"$out/env.txt" 2>&1

# SIGINT at the limit: pytest stops and still prints the tracebacks of the failures so far
OMP_NUM_THREADS=2 SVDKIT_TEST_DATA=$PWD/.gpu/data timeout -s INT -k 30 $(($(left) * 2 / 5)) \
    python3 -m pytest -m "not slow" -n 8 -p no:cacheprovider -rfE --tb=short -q >"$out/tests.txt" 2>&1
echo "tests: exit $? with $(left) s left" >>"$out/env.txt"

for preset in 8b-d8 8b-d32; do
    t=$(($(left) - 10))
    [ "$t" -gt 120 ] || break
    timeout "$t" python3 benchmarks/scale.py --models "$preset" --work /tmp/scale --tokenizer .gpu/tok \
        --timeout $((t - 40)) >>"$out/scale.log" 2>&1
    echo "scale $preset: exit $? with $(left) s left" >>"$out/env.txt"
    cp /tmp/scale/scale.json "$out/scale-$preset.json" 2>/dev/null
done
