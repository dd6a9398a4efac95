#!/usr/bin/env bash
# LoRA finetuning of MiniCPM-Llama3-V 2.5: adapters on the LLM's attention and MLP projections, the resampler
# trained in full (vision tower too with --tune_vision true). Environment: MODEL, DATA, EVAL_DATA, OUTPUT_DIR,
# GPUS_PER_NODE (default: all visible GPUs), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, DS_CONFIG (default:
# the plan's). The run plans its own execution for the GPUs it is on and prints the plan before the first step.
# Extra arguments go to finetune.py (any transformers TrainingArguments flag) and override the defaults.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch_env.sh

launch \
    --use_lora true \
    --tune_vision "${TUNE_VISION:-false}" \
    --learning_rate 1e-4 \
    --weight_decay 0.0 \
    --lora_r 64 --lora_alpha 64 --lora_dropout 0.05 \
    --output_dir "${OUTPUT_DIR:-output/lora}" \
    "$@"
