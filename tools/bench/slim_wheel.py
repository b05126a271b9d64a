"""Rewrite a wheel in place without the files a machine will never load (prepare_gpu_wheels.sh: bitsandbytes'
kernels for other CUDA, ROCm and XPU versions), so what a device call carries stays under its limit.

A file whose path matches --drop goes unless it also matches --keep; its line leaves the wheel's RECORD too, so
the wheel still installs as a whole one. Running it twice changes nothing more. Standard library only.

  python -m tools.bench.slim_wheel .whl/bitsandbytes-*.whl --keep 'libbitsandbytes_(cpu|cuda13[0-9])\\.so$' \\
      --drop 'libbitsandbytes_.*\\.so$'
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path


def slim(wheel: Path, keep: str, drop: str) -> tuple[int, int]:
    """(files dropped, bytes saved)."""
    kept_re, drop_re = re.compile(keep), re.compile(drop)
    gone = lambda name: bool(drop_re.search(name)) and not kept_re.search(name)  # noqa: E731
    with zipfile.ZipFile(wheel) as src:
        dropped = [i for i in src.infolist() if gone(i.filename)]
        if not dropped:
            return 0, 0
        fd, tmp = tempfile.mkstemp(dir=wheel.parent, suffix=".whl")
        os.close(fd)
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in src.infolist():
                if gone(info.filename):
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if not gone(line.split(",", 1)[0])).encode()
                out.writestr(info, data)
    saved = wheel.stat().st_size
    os.replace(tmp, wheel)
    return len(dropped), saved - wheel.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheels", nargs="+", type=Path)
    p.add_argument("--keep", required=True, help="a regular expression: matching files stay")
    p.add_argument("--drop", required=True, help="a regular expression: matching files go (unless kept)")
    a = p.parse_args(argv)
    for wheel in a.wheels:
        if not zipfile.is_zipfile(wheel):
            print(f"slim_wheel: {wheel}: not a wheel (zip) file", file=sys.stderr)
            return 2
        count, saved = slim(wheel, a.keep, a.drop)
        print(f"{wheel.name}: {count} files dropped, {saved / 2**20:.1f} MB smaller, {wheel.stat().st_size / 2**20:.1f}"
              " MB now")
    return 0


if __name__ == "__main__":
    sys.exit(main())
