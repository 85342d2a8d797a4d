#!/usr/bin/env bash
# Set up a virtual environment (CPU torch from the pinned wheel, no CUDA build) and run all tests,
# including the slow test on the real Gemma 3 270M default.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0            # CPU wheel; any other spec may pull a multi-GB CUDA build
pip install -q -e ".[dev]"
python -m pytest -q "$@"
