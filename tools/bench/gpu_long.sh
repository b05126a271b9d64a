#!/usr/bin/env bash
# The long-context GPU run (issue 38.6), for one H100 or H200 with no network: about 9 minutes of device time,
# kept to BUDGET_S (default 480 s of the call; the machine's start and the wheels come on top).
#
# 1. Installs the wheels the image lacks from .whl/ (tools/bench/prepare_gpu_wheels.sh) and builds a model in
#    Qwen2.5-Coder-7B's published shape (configs/models/qwen2.5-coder-7b.json, random bf16 weights, its context
#    raised to MAX_SEQ) with the project's tokenizer, and a corpus of long dialogues (tools/bench/corpus.py:
#    answers of 1,500-6,000 words, several thousand tokens a dialogue, packed into the rows).
# 2. The longest row that fits: loop/train.py on one GPU, one-process ZeRO-3 (accelerate_configs/zero3.yaml), bf16,
#    rank-16 LoRA adapters (a 7B model's states do not fit one GPU for a full fine-tune without offloading the
#    optimizer), gradient checkpointing with the checkpoints offloaded to CPU memory and the MLP in 8 slices
#    (model.offload_checkpoints, model.tiled_mlp), one row a step, 3 steps, at SEQS tokens (default 32768 65536
#    131072 262144) in that order, stopping at the first that runs out of memory (or out of the budget).
# 3. The HF Trainer + DeepSpeed ZeRO-3 (tools/bench/trainer_baseline.py: the same model, rows, adapters and
#    gradient checkpointing, which it cannot offload) at that longest length; a Trainer out of memory there is said.
# 4. Prints, per length, tokens/s, peak GPU memory and whether it fit; the Trainer's beside the longest; and the
#    estimate of tools/estimate_memory.py for the same run. Sequence parallelism over several GPUs is not
#    measured here (one GPU): its speed-up stays unmeasured until a multi-GPU machine is lent.
#
#   bash tools/bench/gpu_long.sh            # on the GPU machine, from the repository root
#   bash tools/bench/gpu_long.sh --dry-run  # the GPU path on CPU, no device work: the 7B shape on the meta device,
#                                           # each device command printed and checked, not run (tools/bench/dry_run.py;
#                                           # tests/test_bench_dry_run.py)
# SEQS="65536 131072" tries only those lengths; REUSE=1 keeps what an earlier call left in $WORK.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/gpu-long}
PY=${PYTHON:-python3}
NEEDS="deepspeed, datasets, peft"
source tools/bench/gpu_common.sh  # environment, wheels, stamp, reuse, fail, launch, on_device, dry_check
SEQS=${SEQS:-32768 65536 131072 262144}
max_seq=${MAX_SEQ:-262144} steps=3 rank=16 shards=8 device=cuda
budget=${BUDGET_S:-480} part_s=${PART_S:-180}
acc=accelerate_configs/zero3.yaml
build_on=$device
if [ -n "$DRY" ]; then build_on=meta budget=""; fi  # nothing runs: no time box
mkdir -p "$WORK"
stamp "building the model (configs/models/qwen2.5-coder-7b.json, context $max_seq) and long dialogues"
reuse "$WORK/model/config.json" ||
  "$PY" tools/make_tiny_model.py --like configs/models/qwen2.5-coder-7b.json --out "$WORK/model" \
    --data "$WORK/chatterbot.jsonl" --device "$build_on" --dtype bf16 --dropout 0 --positions "$max_seq" \
    > "$WORK/model.log" 2>&1 || fail "$WORK/model.log" "the model"
reuse "$WORK/long.jsonl" ||
  "$PY" -c "import sys; from pathlib import Path; from tools.bench import corpus
corpus.build(Path(sys.argv[1]), Path(sys.argv[2]), 120, words=(1500, 6000))" "$WORK/chatterbot.jsonl" "$WORK/long.jsonl"
box() {  # the next launch ends by PART_S seconds, or at the budget's end, whichever is first
  BOX=()
  [ -z "${budget:-}" ] && return
  local left=$((budget - SECONDS - 5))
  BOX=(timeout -k 10 "$((left < part_s ? (left > 1 ? left : 1) : part_s))")
}
out_of_memory() { grep -qiE "out of memory|OutOfMemoryError" "$1"; }
longest="" tried=""
for seq in $SEQS; do
  if [ -n "${budget:-}" ] && [ $((budget - SECONDS)) -lt 120 ]; then
    stamp "stopped before $seq tokens: $((budget - SECONDS)) s of the call's $budget s left"; break
  fi
  stamp "loop/train.py: one $seq-token row a step, LoRA rank $rank, checkpoints offloaded, MLP in $shards slices"
  tried="$tried $seq"
  if ! reuse "$WORK/run-$seq/tensorboard"; then
    box
    if ! launch --config_file "$acc" loop/train.py configs/quickstart.yaml --name_or_path "$WORK/model" \
      --train_files "[$WORK/long.jsonl]" --cache_dir "$WORK/cache" --seq_len "$seq" --micro_batch_size 1 \
      --gradient_accumulation_steps 1 --max_steps "$steps" --log_every 1 --eval_fraction 0 --sample_prompts "[]" \
      --warmup_steps 0 --lr 1e-4 --attn_implementation auto --model.gradient_checkpointing true \
      --model.offload_checkpoints true --model.tiled_mlp "$shards" --lora.enabled true --lora.rank "$rank" \
      --lora.dropout 0 --output_dir "$WORK/run-$seq" --save false > "$WORK/run-$seq.log" 2>&1; then
      if out_of_memory "$WORK/run-$seq.log"; then stamp "$seq tokens: out of memory"; break; fi
      fail "$WORK/run-$seq.log" "loop/train.py at $seq tokens"; break
    fi
  fi
  longest=$seq
done
if [ -n "$longest" ]; then
  stamp "HF Trainer + DeepSpeed ZeRO-3 at $longest tokens (LoRA rank $rank, gradient checkpointing)"
  if ! reuse "$WORK/trainer-$longest.json"; then
    box
    launch --config_file "$acc" --module tools.bench.trainer_baseline "$WORK/model" "$WORK/long.jsonl" \
      --seq-len "$longest" --micro-batch 1 --steps "$steps" --warmup 1 --checkpointing --lora-rank "$rank" \
      > "$WORK/trainer-$longest.json" 2> "$WORK/trainer-$longest.log" ||
      { out_of_memory "$WORK/trainer-$longest.log" && stamp "the Trainer: out of memory at $longest tokens"; } ||
      fail "$WORK/trainer-$longest.log" "HF Trainer at $longest tokens"
  fi
fi
stamp "results (7B-shaped Qwen2.5-Coder, one GPU)"
on_device "$PY" -m tools.bench.gpu_long_report "$WORK" --tried $tried --longest "${longest:-0}" --lora-rank "$rank" \
  --tiled-mlp "$shards"
dry_check
[ -z "$failed" ] || { stamp "FAILED:${failed#;}"; exit 1; }
stamp done
