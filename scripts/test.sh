#!/usr/bin/env bash
# Set up and run the tests, as CI does (via .ci/run):
#   1. .venv: CPU torch from the pinned wheel and the package with the newest transformers the pin allows;
#      the whole suite, including the slow test on the real Gemma 3 270M default.
#   2. .venv-transformers-5.24: the oldest supported transformers release; the decoding tests (generate,
#      n-gram rounds, Gemma 4, verify head, remote code, the batched engine, the hook, the slow Gemma 3 test).
# Arguments go to the first pytest run only (e.g. `bash scripts/test.sh -x -k generate`); set
# HF_DSPARK_SKIP_OLDEST=1 to run part 1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST_TRANSFORMERS=5.24.0
DECODING_TESTS=(tests/decoding/test_generate.py tests/decoding/test_ngram_lookup.py tests/models/test_gemma4.py tests/models/test_verify_head.py
                tests/checkpoints/test_remote_code.py tests/decoding/test_batched.py tests/decoding/test_generate_hook.py
                tests/decoding/test_transformers_releases.py tests/models/test_fused_warpers.py tests/decoding/test_gemma_default.py
                tests/decoding/test_engine_config.py tests/decoding/test_support_sampling.py)

setup() {  # setup VENV [extra pip requirement]
    python3 -m venv "$1"
    "$1/bin/pip" install -q --upgrade pip
    "$1/bin/pip" install -q torch==2.13.0          # CPU wheel; any other spec may pull a multi-GB CUDA build
    "$1/bin/pip" install -q -e ".[dev]" ${2:+"$2"}
}

start=$SECONDS
setup .venv
echo "== part 1: the whole suite on transformers $(.venv/bin/python -c 'import transformers; print(transformers.__version__)')"
.venv/bin/python -m pytest -q --durations=15 "$@"
echo "== part 1 done in $((SECONDS - start)) s"

if [ "${HF_DSPARK_SKIP_OLDEST:-0}" != 1 ]; then
    start=$SECONDS
    setup .venv-transformers-5.24 "transformers==$OLDEST_TRANSFORMERS"
    echo "== part 2: decoding tests on transformers $(.venv-transformers-5.24/bin/python -c 'import transformers; print(transformers.__version__)')"
    .venv-transformers-5.24/bin/python -m pytest -q "${DECODING_TESTS[@]}"
    echo "== part 2 done in $((SECONDS - start)) s"
fi
