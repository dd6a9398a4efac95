# Shared by finetune_ds.sh and finetune_lora.sh: environment -> torchrun + finetune.py with common defaults.
# How to run on the GPUs at hand (micro-batch, recomputation, compiled blocks, ZeRO stage, ...) is decided by
# finetune.plan inside the run, and printed before the first step.

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
DEEPSPEED=()
[ -n "${DS_CONFIG:-}" ] && DEEPSPEED=(--deepspeed "$DS_CONFIG")   # default: the plan's ZeRO stage (none on one GPU)

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
        --model_max_length 2048 \
        --num_train_epochs 1 \
        --lr_scheduler_type cosine \
        --warmup_steps 0.03 \
        --adam_beta2 0.95 \
        --dataloader_num_workers 4 \
        --train_sampling_strategy group_by_length \
        --logging_steps 10 \
        --save_strategy steps --save_steps 1000 --save_total_limit 3 \
        --report_to tensorboard \
        "$@"
}
