#!/usr/bin/env bash
# The plain launch script on one GPU, with only MODEL / DATA / TUNE_VISION (and --gpu_memory_limit, and flags the case
# names) set: the plan it prints, its measured peak and its throughput, one line of JSON per case in OUT/runs.jsonl.
#   bash bench/plan_validation.sh OUT_DIR DATA [CASE ...]   CASE: name:TUNE_VISION[:LIMIT[:FLAGS]], FLAGS separated
#   by commas, e.g. frozen24:false:24GiB or qlora12:false:12GiB:--quantization,nf4
set -uo pipefail
out=$1 data=$2; shift 2
model=${MODEL:-/tmp/random-8b}
[ -f "$model/config.json" ] || python bench/launch_script_rate.py --make_checkpoint "$model"
for case in "$@"; do
    IFS=: read -r name vision limit flags <<< "$case"
    rm -rf "/tmp/run_$name"
    start=$(date +%s)
    MODEL=$model DATA=$data OUTPUT_DIR=/tmp/run_$name TUNE_VISION=$vision bash finetune_lora.sh \
        --max_steps 10 --logging_steps 2 --save_strategy no ${limit:+--gpu_memory_limit $limit} ${flags//,/ } \
        > "/tmp/run_$name.log" 2>&1
    rc=$?
    grep -E "plan for|^  [a-z -]+: |peak GPU memory|Error|error:" "/tmp/run_$name.log" | sed "s/^/[$name] /" >> "$out/log.txt"
    [ $rc = 0 ] || tail -30 "/tmp/run_$name.log" | sed "s/^/[$name] /" >> "$out/log.txt"
    rate=$(python bench/launch_script_rate.py --events "/tmp/run_$name" --from_step 4 --data "$data" --lora 2>/dev/null | tail -1)
    peak=$(grep -o "peak GPU memory [0-9.]* GiB allocated ([0-9.]* reserved); the plan predicted [0-9.]*" "/tmp/run_$name.log")
    echo "{\"case\": \"$name\", \"tune_vision\": \"$vision\", \"limit\": \"$limit\", \"flags\": \"$flags\", \"rc\": $rc, \"wall_s\": $(( $(date +%s) - start )), \"peak\": \"$peak\", \"rate\": ${rate:-null}}" >> "$out/runs.jsonl"
done
