# Sourced by gpu_check.sh and gpu_scale.sh from the repository root, after they set PY (the interpreter) and
# NEEDS (the modules the image must import): the environment of an offline run, the wheels the image lacks
# (from .whl/, made by tools/bench/prepare_gpu_wheels.sh) installed once into /tmp/site, and the helpers both
# scripts use. BOX (a command prefix, e.g. `timeout 150`) time-boxes every launch; empty: none.
# --dry-run (the script's first argument) takes the real path on CPU: every Python step that needs no device
# runs (configs made, models built on the meta device: config and tokenizer, no weights), every device command
# goes through on_device, which prints it and keeps it in $WORK/dry-run.commands, and dry_check checks them all
# at the end without running them (tools/bench/dry_run.py: imports, arguments, configs read back).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PYTHONPATH"  # installed by an earlier call here
if [ -d .whl ] && ! "$PY" -c "import $NEEDS" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
stamp() { echo "[$(date +%H:%M:%S)] $*"; }
reuse() { [ -n "${REUSE:-}" ] && [ -s "$1" ] && stamp "reusing $1"; }  # true: an earlier call made FILE
failed=""
fail() {  # LOG WHAT: a part that failed is shown and named at the end; the other parts still run
  tail -30 "$1"; failed="$failed; $2"; stamp "FAILED: $2 (the other parts go on; $1)"
}
DRY=""
if [ "${1:-}" = "--dry-run" ]; then
  DRY="$WORK/dry-run.commands"
  mkdir -p "$WORK" && : > "$DRY"
  export DS_ACCELERATOR=cpu
fi
exec 3>&1  # the script's own output: a dry run prints each command there even where the command's output goes to a log
on_device() {  # COMMAND...: device work; under --dry-run printed and kept for dry_check instead of run
  if [ -z "$DRY" ]; then "$@"; return; fi
  echo "dry run: $*" >&3
  printf '%q ' "$@" >> "$DRY" && echo >> "$DRY"
}
dry_check() {  # under --dry-run: every kept command checked in one process; a failure is named at the end
  [ -z "$DRY" ] && return
  stamp "dry run: checking the $(wc -l < "$DRY") device commands (imports, arguments, configs read back)"
  "$PY" -m tools.bench.dry_run "$DRY" || failed="$failed; the dry run's device commands"
}
port=29500
BOX=()
launch() {  # a fresh port each time: a launch a timeout killed can leave its child holding the last one
  port=$((port + 1))
  on_device "${BOX[@]}" "$PY" -m accelerate.commands.launch --num_processes 1 --main_process_port "$port" "$@"
}
