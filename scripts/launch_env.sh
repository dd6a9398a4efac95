# Shared by finetune_ds.sh and finetune_lora.sh: environment -> torchrun + finetune.py with common defaults.
# bf16 where the GPU has it, fp32 otherwise (on CPU DeepSpeed runs with DS_ACCELERATOR=cpu).

# torchrun through finetune.launch: a run stopped by a mistake ends with its own message (DEBUG=1: tracebacks too);
# with --help, what the script does, its environment and finetune.py's flags with the script's values as defaults
LAUNCHER=(python3 -m finetune.launch --script "$(basename "$0")")
if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
    LAUNCHER+=(--help) MODEL=${MODEL:-'$MODEL'} DATA=${DATA:-'$DATA'} GPUS_PER_NODE=${GPUS_PER_NODE:-1}
fi
torchrun() { "${LAUNCHER[@]}" "$@"; }

if [ -z "${MODEL:-}" ] && [ -z "${DATA:-}" ]; then  # nothing configured: the embedded demo, through this script
    exec python3 -m finetune.demo --script "$(basename "$0")" "$@"
fi

GPUS_PER_NODE=${GPUS_PER_NODE:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6001}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # shapes vary by batch
DS_CONFIG=${DS_CONFIG:-ds_config_zero2.json}   # "none": plain PyTorch (one GPU, no ZeRO)
DEEPSPEED=()
[ "$DS_CONFIG" != none ] && DEEPSPEED=(--deepspeed "$DS_CONFIG")

if python3 -c 'import torch, sys; sys.exit(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()))'; then
    # compiled blocks: ~1.3x, after a minute or two of compiling; padding-free batches: no compute on padding,
    # and flash's variable-length kernel builds nothing per new length (cuDNN: ~0.1 s per shape)
    GPU_DEFAULTS=(--bf16 true --compile_blocks true)
    # not with CUDA graphs, which record each batch shape once: padded batches there (finetune.py rounds to 64)
    if [[ " $* " != *" --cuda_graphs true "* && " $* " != *" --cuda_graphs=true "* ]]; then
        GPU_DEFAULTS+=(--padding_free true)
    fi
else
    GPU_DEFAULTS=()
    if python3 -c 'import torch, sys; sys.exit(torch.cuda.is_available())'; then
        export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    fi
fi

launch() {
    if [ -z "${MODEL:-}" ] || [ -z "${DATA:-}" ]; then
        echo "set MODEL (a MiniCPM-Llama3-V 2.5 folder) and DATA (JSON/JSONL training data)" >&2
        exit 2
    fi
    torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        -m finetune.finetune \
        --model_name_or_path "$MODEL" \
        --data_path "$DATA" \
        ${EVAL_DATA:+--eval_data_path "$EVAL_DATA" --eval_strategy steps --eval_steps 500} \
        "${DEEPSPEED[@]}" \
        "${GPU_DEFAULTS[@]}" \
        --model_max_length 2048 \
        --per_device_train_batch_size 1 \
        --gradient_accumulation_steps 1 \
        --num_train_epochs 1 \
        --lr_scheduler_type cosine \
        --warmup_steps 0.03 \
        --adam_beta2 0.95 \
        --gradient_checkpointing true \
        --dataloader_num_workers 4 \
        --train_sampling_strategy group_by_length \
        --logging_steps 10 \
        --save_strategy steps --save_steps 1000 --save_total_limit 3 \
        --report_to tensorboard \
        "$@"
}
