"""What the checkpoint digests cost: writing a checkpoint's files as a save does, against hashing them after.

  python tools/make_tiny_model.py --hidden 2048 --layers 24 --heads 16 --positions 2048 --vocab-size 49152 \\
      --dropout 0 --out /tmp/model-1b
  python -m tools.bench.checksums /tmp/model-1b [--work /tmp/bench-checksums]

The model's weights are written the two ways a checkpoint's files are: as safetensors (model.safetensors, as
accelerate's save_state writes it) and with torch.save (torch's zip format: optimizer.bin and every ZeRO-3
shard). Right after each write the file is hashed as the save does (`integrity.record`, while its pages are
still in memory), then the whole folder is verified as resume does (`integrity.problems`: digests and the
safe reader). Prints seconds and GB/s of each and the digests' share of the save. Writing a whole 1.1B
checkpoint (fp32 weights, AdamW's two moments: 13 GB) takes more memory than a 24 GiB CPU machine has to
spare, so the weights (4.4 GB) stand in for each kind of file: both writing and hashing go byte by byte.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loop.state import integrity
from loop.state.progress import LoopState

GB = 1e9


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a model folder with model.safetensors (the 1.1B model, built as above)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-checksums"), help="where the files are written")
    a = p.parse_args()
    tensors = load_file(a.model / "model.safetensors")
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{a.model}: {sum(t.numel() for t in tensors.values()):,} parameters, {size / GB:.2f} GB of weights")
    shutil.rmtree(a.work, ignore_errors=True)
    folder = a.work / "step_00000001"
    folder.mkdir(parents=True)
    writes = {"model.safetensors": lambda: save_file(tensors, str(folder / "model.safetensors"),
                                                     metadata={"format": "pt"}),
              "optimizer.bin": lambda: torch.save(tensors, folder / "optimizer.bin")}
    print(f"{'file':<20} {'write s':>8} {'GB/s':>6} {'digest s':>9} {'GB/s':>6} {'digest / write':>15}")
    total_write = total_digest = 0.0
    for name, write in writes.items():
        wrote = timed(write)
        hashed = timed(lambda n=name: integrity.digest(folder / n))
        nbytes = (folder / name).stat().st_size
        total_write, total_digest = total_write + wrote, total_digest + hashed
        print(f"{name:<20} {wrote:>8.2f} {nbytes / GB / wrote:>6.2f} {hashed:>9.2f} {nbytes / GB / hashed:>6.2f} "
              f"{hashed / wrote:>15.3f}")
    print(f"{'both':<20} {total_write:>8.2f} {'':>6} {total_digest:>9.2f} {'':>6} {total_digest / total_write:>15.3f}")
    (folder / "loop_state.json").write_text(LoopState(step=1).to_json())
    integrity.write_manifest(folder, {})
    verified = timed(lambda: integrity.problems(folder))
    print(f"verification as resume does it (digests of both files and the safe reader, pages in memory): "
          f"{verified:.2f} s, {2 * size / GB / verified:.2f} GB/s")
    shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
