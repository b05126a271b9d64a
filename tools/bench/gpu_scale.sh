#!/usr/bin/env bash
# The second prepared GPU run: StarCoder2 at the sizes users train, each part beside its baseline in one call,
# on one H100 or H200 with no network. Planned for under 7 minutes of device time; not yet run on a GPU.
#
# 1. Installs the wheels the image lacks from .whl/ (tools/bench/prepare_gpu_wheels.sh: deepspeed, datasets,
#    peft, bitsandbytes, trl, ...), builds random-weight models in the published shapes of
#    configs/models/starcoder2-3b.json and starcoder2-7b.json with the project's tokenizer and corpus.
# 2. Every part trains packed 4,096-token rows of the shipped corpus, bf16, gradient checkpointing, one process,
#    STEPS optimizer steps (logged every 2; the first window is left out of every figure), at the largest
#    micro-batch (a power of two, up to MAX_MB) that tools/estimate_memory.py's estimate says both the loop and
#    its baseline fit in 80% of the GPU (tools/bench/scale.py batch):
#    full  StarCoder2-3B, every weight, ZeRO-3: loop/train.py against the HF Trainer + DeepSpeed ZeRO-3
#          (tools/bench/trainer_baseline.py) on the same model, rows and batch;
#    fsdp2 the full part's run under the second engine, FSDP2 (accelerate_configs/fsdp2.yaml), against the same
#          Trainer baseline, and its tokens/s over the full part's (which engine to choose, measured);
#    dpo   StarCoder2-3B DPO, ZeRO-3, on pairs made from the same corpus, whole pairs packed into the same
#          rows, reference log-probabilities precomputed: against TRL's DPOTrainer on the same pairs (its
#          precomputed reference; TRL 1.16 has padding-free turned off), with as many pairs a step, and
#          against the full part's run (the loop's own SFT step on the same rows and batch);
#    lora  StarCoder2-7B, rank-16 adapters on every projection, one process without DeepSpeed (the one-GPU
#          recipe): against the HF Trainer + peft on the same model, rows, adapter and batch;
#    qlora the same on a 4-bit NF4 base: against the HF Trainer + peft + bitsandbytes;
#    moe   Qwen3-Coder-30B-A3B (configs/models/qwen3-coder-30b-a3b.json, a mixture of 128 experts, 8 active),
#          rank-16 adapters on the attention projections (the packed experts and the router frozen), one
#          process without DeepSpeed, the router's balancing loss on: against the HF Trainer + peft.
# 3. Prints, per run, tokens/s, MFU (the frozen base's FLOPs for LoRA: loop/model/flops.py), peak memory, the
#    step's time split and the loss of the first and last windows; the memory estimate against each loop
#    run's measured peak (within 15%, or to be corrected); and each goal with PASS or FAIL.
#
#   bash tools/bench/gpu_scale.sh            # on the GPU machine, from the repository root
#   bash tools/bench/gpu_scale.sh --tiny     # every part at toy size on CPU (tests/test_bench_scale.py)
#   bash tools/bench/gpu_scale.sh --dry-run  # the GPU path on CPU, no device work: the published shapes on the meta
#                                            # device, batches for an 80 GB GPU, each device command printed and
#                                            # checked, not run (tools/bench/dry_run.py; tests/test_bench_dry_run.py)
#
# PARTS="full dpo" runs only those parts (default: full fsdp2 dpo lora qlora moe, in that order; dpo's SFT
# comparison and fsdp2's engine comparison need full). On the GPU the call keeps to BUDGET_S seconds (default
# 390: 7 minutes with the machine's start and the wheels; the last parts then need a second call, named at the
# end): a part starts only with MIN_PART_S (120) left, each launch ends by PART_S (150) or the budget's end; a part that hangs or runs out of memory is named at the end (exit 1), one left out is named
# with the command that runs it. REUSE=1 keeps what an earlier call left in $WORK (models, runs, baselines): a
# second call with PARTS of what is missing costs only theirs. STEPS (default 8), MAX_MB (8).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/gpu-scale}
PY=${PYTHON:-python3}
NEEDS="deepspeed, datasets, peft, trl, bitsandbytes"
source tools/bench/gpu_common.sh  # environment, wheels, stamp, reuse, fail, launch, on_device, dry_check
PARTS=${PARTS:-full fsdp2 dpo lora qlora moe}
log=2 rank=16
if [ "${1:-}" = "--tiny" ]; then  # the published architectures at toy width; the batch from a 1 GB "device"
  steps=${STEPS:-6} shrink=(--hidden 64 --layers 2 --heads 4 --vocab-size 4096)
  seq=256 acc=accelerate_configs/cpu_zero3.yaml device=cpu dtype=fp32 memory=(--memory-gb 1) cap=${MAX_MB:-2}
  fsdp=accelerate_configs/cpu_fsdp2.yaml
  budget=${BUDGET_S:-} part_s=${PART_S:-600}  # no budget unless asked (tests/test_bench_scale.py asks for none left)
  dpo_lr=5e-4  # six toy steps at the GPU's 1e-5 leave DPO's loss at log 2 to four places, on either side
  export DS_ACCELERATOR=cpu
else
  steps=${STEPS:-8} shrink=() seq=4096 acc=accelerate_configs/zero3.yaml device=cuda dtype=bf16 memory=() cap=${MAX_MB:-8}
  fsdp=accelerate_configs/fsdp2.yaml
  budget=${BUDGET_S:-390} part_s=${PART_S:-150} dpo_lr=1e-5
fi
build_on=$device
if [ -n "$DRY" ]; then  # the shapes on the meta device, the batch for an H100's 80 GB, no time box: nothing runs
  build_on=meta memory=(--memory-gb 80) budget=""
fi
mkdir -p "$WORK"
"$PY" -m tools.bench.ds_variant "$acc" "$WORK/plain" deepspeed=off > /dev/null  # LoRA's launch: no DeepSpeed
skipped=""
has() {  # PART: asked for, and (on the GPU) the call's budget leaves it room for its two launches
  [[ " $PARTS " == *" $1 "* ]] || return 1
  [ -z "${budget:-}" ] && return 0
  local left=$((budget - SECONDS))
  if [ "$left" -lt "${MIN_PART_S:-120}" ]; then
    [[ " $skipped " == *" $1 "* ]] || { skipped="$skipped $1"; stamp "skipped $1: ${left} s of the call's ${budget} s left"; }
    return 1
  fi
}
box() {  # the next launch ends by PART_S seconds, or at the budget's end, whichever is first
  [ -z "${budget:-}" ] && return
  local left=$((budget - SECONDS - 5))
  BOX=(timeout -k 10 "$((left < part_s ? (left > 1 ? left : 1) : part_s))")
}
model() {  # NAME SHAPE: random weights in configs/models/SHAPE.json's published shape
  reuse "$WORK/$1/config.json" && return
  stamp "building $1 (configs/models/$2.json${shrink:+, shrunk for CPU})"
  "$PY" tools/make_tiny_model.py --like "configs/models/$2.json" --out "$WORK/$1" --data "$WORK/data.jsonl" \
    --device "$build_on" --dtype "$dtype" --dropout 0 "${shrink[@]}" > "$WORK/$1.log" 2>&1 \
    || fail "$WORK/$1.log" "model $1"
}
batch() {  # PART MODEL: the largest micro-batch the estimate lets the loop and its baseline fit in
  "$PY" -m tools.bench.scale batch "$WORK/$2" --part "$1" --seq-len "$seq" --cap "$cap" "${memory[@]}" \
    2> "$WORK/batch-$1.log"
}
train() {  # PART MODEL MB CONFIG [overrides]: loop/train.py on the packed rows
  local part=$1 name=$2 mb=$3 config=$4; shift 4
  reuse "$WORK/run-$part.log" && [ -d "$WORK/run-$part/tensorboard" ] && return
  stamp "loop/train.py: $part, micro-batch $mb"
  box
  launch --config_file "$config" loop/train.py configs/quickstart.yaml --name_or_path "$WORK/$name" \
    --train_files "[$WORK/data.jsonl]" --cache_dir "$WORK/cache" --seq_len "$seq" --micro_batch_size "$mb" \
    --gradient_accumulation_steps 1 --max_steps "$steps" --log_every "$log" --eval_fraction 0 --sample_prompts "[]" \
    --warmup_steps 2 --gradient_checkpointing true --attn_implementation auto --output_dir "$WORK/run-$part" \
    --save false "$@" > "$WORK/run-$part.log" 2>&1 || fail "$WORK/run-$part.log" "loop/train.py $part"
}
baseline() {  # PART CONFIG MODULE ARGS...: a baseline's JSON line into PART-baseline.json
  local part=$1 config=$2 module=$3; shift 3
  reuse "$WORK/$part-baseline.json" && return
  stamp "baseline: $part ($module)"
  box
  launch --config_file "$config" --module "$module" "$@" --steps "$steps" --warmup "$log" --checkpointing \
    > "$WORK/$part-baseline.json" 2> "$WORK/$part-baseline.log" || fail "$WORK/$part-baseline.log" "$module $part"
}
ran=()
if has full || has fsdp2 || has dpo; then
  model sc2-3b starcoder2-3b
  mb3=$(batch full sc2-3b) || { fail "$WORK/batch-full.log" "the micro-batch of full"; mb3=1; }
fi
if has full; then
  train full sc2-3b "$mb3" "$acc" --lr 1e-4
  baseline full "$acc" tools.bench.trainer_baseline "$WORK/sc2-3b" "$WORK/data.jsonl" --seq-len "$seq" \
    --micro-batch "$mb3" --lr 1e-4
  ran+=("full=$mb3")
fi
if has fsdp2; then  # measured against full's baseline (its JSON): the same model, rows and batch
  train fsdp2 sc2-3b "$mb3" "$fsdp" --lr 1e-4
  ran+=("fsdp2=$mb3")
fi
if has dpo; then
  reuse "$WORK/pairs-train.jsonl" || "$PY" tools/make_preference_pairs.py --out "$WORK/pairs" --eval-fraction 0 \
    > "$WORK/pairs-made.log" 2>&1 || fail "$WORK/pairs-made.log" "preference pairs"
  train dpo sc2-3b "$mb3" "$acc" --objective dpo --train_files "[$WORK/pairs-train.jsonl]" --lr "$dpo_lr"
  trl_acc=4  # TRL pads every pair to the longest of its batch: 4 micro-batches a step bound its memory
  trl=$("$PY" -m tools.bench.scale pairs "$WORK/sc2-3b" "$WORK/pairs-train.jsonl" --seq-len "$seq" \
    --micro-batch "$mb3" --accumulation "$trl_acc" 2> "$WORK/pairs.log") || { fail "$WORK/pairs.log" "TRL batch"; trl=1; }
  baseline dpo "$acc" tools.bench.dpo_baseline "$WORK/sc2-3b" "$WORK/pairs-train.jsonl" --micro-batch "$trl" \
    --accumulation "$trl_acc" --precompute --lr "$dpo_lr"
  ran+=("dpo=$mb3")
fi
if has lora || has qlora; then
  model sc2-7b starcoder2-7b
  # QLoRA takes LoRA's batch: the same work a step, on a smaller base
  mb7=$(batch lora sc2-7b) || { fail "$WORK/batch-lora.log" "the micro-batch of lora"; mb7=1; }
fi
for part in lora qlora; do
  has $part || continue
  quant=() flag=()
  [ $part = qlora ] && quant=(--lora.quantize 4bit) flag=(--qlora)
  train $part sc2-7b "$mb7" "$WORK/plain/accelerate.yaml" --lora.enabled true --lora.rank $rank "${quant[@]}" --lr 1e-3
  baseline $part "$WORK/plain/accelerate.yaml" tools.bench.trainer_baseline "$WORK/sc2-7b" "$WORK/data.jsonl" \
    --seq-len "$seq" --micro-batch "$mb7" --lora-rank $rank "${flag[@]}" --lr 1e-3
  ran+=("$part=$mb7")
done
if has moe; then  # the LoRA recipe of configs/qwen3-coder-30b-a3b-lora-1gpu.yaml, at the loop's own batch
  model q3c-30b qwen3-coder-30b-a3b
  mbm=$(batch moe q3c-30b) || { fail "$WORK/batch-moe.log" "the micro-batch of moe"; mbm=1; }
  train moe q3c-30b "$mbm" "$WORK/plain/accelerate.yaml" --lora.enabled true --lora.rank $rank --lr 1e-3
  baseline moe "$WORK/plain/accelerate.yaml" tools.bench.trainer_baseline "$WORK/q3c-30b" "$WORK/data.jsonl" \
    --seq-len "$seq" --micro-batch "$mbm" --lora-rank $rank --lr 1e-3
  ran+=("moe=$mbm")
fi
stamp "results"
[ ${#ran[@]} -eq 0 ] || on_device "$PY" -m tools.bench.scale report "$WORK" --seq-len "$seq" --batch "${ran[@]}"
[ -z "$skipped" ] || stamp "not measured in this call (its ${budget} s budget):$skipped; the same machine can finish:" \
  "REUSE=1 PARTS=\"${skipped# }\" bash tools/bench/gpu_scale.sh"
dry_check
[ -z "$failed" ] || { stamp "FAILED:${failed#;}"; exit 1; }
stamp done
