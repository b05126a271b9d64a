#!/usr/bin/env bash
# GPU throughput and correctness check, for one H100 or H200, no network, under 8 minutes.
#
# Builds a ~1.3B-parameter GPTBigCode (24 layers, d=2048, multi-query, StarCoder's 49152 vocabulary,
# random weights) with the project's tokenizer and corpus, then for each attention choice trains
# 30 steps of packed 2048-token rows in bf16 with ZeRO-3 on one process and prints tokens/s and MFU
# (from the run's own TensorBoard), then checks on the GPU that each dialogue's logits inside a packed
# batch equal its logits alone.
#
#   bash tools/bench/gpu_check.sh            # on the GPU machine, from the repository root
#   bash tools/bench/gpu_check.sh --tiny     # the same steps at toy size on CPU (tests/test_bench.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/gpu-check}
PY=${PYTHON:-python}  # the interpreter of the environment the project is installed in
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "${1:-}" = "--tiny" ]; then
  dims=(--n-embd 64 --n-layer 2 --n-head 4 --n-positions 512)
  seq=256 mb=2 steps=6 log=3 acc=accelerate_configs/cpu_zero3.yaml attns="sdpa sdpa_varlen"
  export DS_ACCELERATOR=cpu
else
  dims=(--n-embd 2048 --n-layer 24 --n-head 16 --n-positions 2048 --vocab-size 49152)
  seq=2048 mb=8 steps=30 log=10 acc=accelerate_configs/zero3.yaml attns="sdpa flash_attention_2 sdpa_varlen"
fi
mkdir -p "$WORK"
"$PY" tools/make_tiny_model.py --out "$WORK/model" --data "$WORK/data.jsonl" "${dims[@]}"
for attn in $attns; do
  "$PY" -m accelerate.commands.launch --config_file "$acc" --num_processes 1 loop/train.py configs/quickstart.yaml \
    --name_or_path "$WORK/model" --train_files "[$WORK/data.jsonl]" --cache_dir "$WORK/cache" \
    --seq_len "$seq" --micro_batch_size "$mb" --gradient_accumulation_steps 1 --max_steps "$steps" \
    --log_every "$log" --eval_fraction 0 --sample_prompts "[]" --lr 1e-4 --warmup_steps 2 \
    --attn_implementation "$attn" --output_dir "$WORK/run-$attn" --save false > "$WORK/run-$attn.log" 2>&1 \
    || { tail -30 "$WORK/run-$attn.log"; exit 1; }
done
"$PY" - "$WORK" $attns <<'PY'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
work, attns = sys.argv[1], sys.argv[2:]
print(f"{'attention':20s} {'tokens/s':>10s} {'MFU':>7s} {'peak mem GB':>12s}")
for attn in attns:
    acc = EventAccumulator(f"{work}/run-{attn}/tensorboard")
    acc.Reload()
    last = lambda tag: acc.Scalars(tag)[-1].value if tag in acc.Tags()["scalars"] else float("nan")
    fell_back = "falling back" in open(f"{work}/run-{attn}.log").read()
    print(f"{attn:20s} {last('throughput/tokens_per_s'):10,.0f} {last('throughput/mfu'):7.1%} "
          f"{last('memory/peak_bytes') / 2**30:12.1f}" + ("  (fell back to sdpa)" if fell_back else ""))
PY
"$PY" tools/bench/packed_logits.py "$WORK/model" "$WORK/data.jsonl" --attention $attns --seq-len "$seq"
