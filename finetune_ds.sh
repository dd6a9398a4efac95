#!/usr/bin/env bash
# Full finetuning of MiniCPM-Llama3-V 2.5 (LLM, vision tower and resampler) under DeepSpeed ZeRO-2
# (DS_CONFIG=ds_config_zero1.json: faster with gradient accumulation; keeps the whole
# gradient on each GPU: 8 GiB more per GPU on 2 GPUs, 14 on 8;
# DS_CONFIG=ds_config_zero3.json for ZeRO-3: give it several samples per GPU, e.g.
# --per_device_train_batch_size 4 --gradient_accumulation_steps 4, 0.95x ZeRO-2's speed; 0.7x at 1).
# Environment: MODEL, DATA, EVAL_DATA, OUTPUT_DIR, GPUS_PER_NODE (default: all visible GPUs), NNODES,
# NODE_RANK, MASTER_ADDR, MASTER_PORT, DS_CONFIG.
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
