#!/usr/bin/env bash
# Full finetuning of MiniCPM-Llama3-V 2.5 (LLM, vision tower and resampler). The run plans its own execution for
# the GPUs it is on (ZeRO stage, micro-batch, recomputation) and prints the plan before the first step.
# Environment: MODEL, DATA, EVAL_DATA, OUTPUT_DIR, GPUS_PER_NODE (default: all visible GPUs), NNODES,
# NODE_RANK, MASTER_ADDR, MASTER_PORT, DS_CONFIG (a ds_config_zero*.json to choose the ZeRO stage yourself).
# Extra arguments go to finetune.py (any transformers TrainingArguments flag) and override the defaults.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch_env.sh

launch \
    --tune_llm true --tune_vision true \
    --learning_rate 1e-5 \
    --weight_decay 0.1 \
    --output_dir "${OUTPUT_DIR:-output/full}" \
    "$@"
