#!/usr/bin/env bash
# Adapt the shipped Gemma 3 270M drafter to the target's GREEDY answers (it was trained on sampled ones).
#
#   bash recipes/gemma-3-270m-greedy-adapt.sh      # every step is resumable: rerun after an interruption
#
# Greedy answers on 288 gsm8k-train prompts (29 held out for calibration) -> feature cache -> 400 steps
# from the shipped drafter -> STS calibration. About 45 minutes on a 2-core AVX2 CPU (2 threads): 12 min
# regeneration, 10 min cache, 19 min training, 3 min calibration. Measured result (docs/experiments.md,
# "Greedy-answer adaptation"): drafter-alone tau on 8 gsm8k eval prompts 3.07 against 2.66, not shipped.
# Knobs (environment): PROMPTS_DIR, WORK, NUM_PROMPTS, STEPS, THREADS.
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPTS_DIR=${PROMPTS_DIR:-../shared/data/prompts}
WORK=${WORK:-work_data/greedy_adapt}
NUM_PROMPTS=${NUM_PROMPTS:-288}
STEPS=${STEPS:-400}
THREADS=${THREADS:-2}
TARGET=gemma-3-270m
mkdir -p "$WORK"

hf-dspark prepare-data --target $TARGET --prompts "$PROMPTS_DIR"/train/gsm8k-train.jsonl --output "$WORK/data" \
    --num-prompts "$NUM_PROMPTS" --max-new-tokens 128 --batch-size 32 --holdout 0.1 --greedy --seed 1 \
    --threads "$THREADS" --dtype float32
hf-dspark build-cache --target $TARGET --data "$WORK/data" --output "$WORK/cache" --target-topk 64 \
    --dtype float32 --threads "$THREADS"
# --init-draft of the bf16 shipped drafter trains float32 weights (train converts them)
hf-dspark train --target $TARGET --cache "$WORK/cache" --init-draft hf_dspark/assets/gemma-3-270m-dspark \
    --num-draft-layers 2 --block-size 7 --draft-vocab-size 32768 --num-anchors 32 --markov-rank 64 \
    --markov-head-type vanilla --per-device-train-batch-size 4 --learning-rate 3e-4 --warmup-steps 30 \
    --max-steps "$STEPS" --logging-steps 20 --save-steps 100 --threads "$THREADS" --output "$WORK/drafter"
hf-dspark calibrate --target $TARGET --draft "$WORK/drafter" --prompts "$WORK/data/holdout.jsonl" --max-prompts 29 \
    --max-new-tokens 128 --report "$WORK/calibration.json"
