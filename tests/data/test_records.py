"""Reading records: a corrupted Parquet file is a bad record named by file and row group, exit 2, every time
(issue 25: it once exited 134 after the right message, one run in three)."""

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import ROOT


def test_a_corrupted_parquet_file_is_one_named_bad_record_and_exit_2_every_time(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": "an answer " * 8}]} for i in range(3000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "good.parquet", row_group_size=500)
    data = bytearray((tmp_path / "good.parquet").read_bytes())
    data[len(data) // 2:len(data) // 2 + 2000] = bytes(2000)  # one row group's pages zeroed, the footer intact
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    for _ in range(3):
        done = subprocess.run([sys.executable, "tools/convert_data.py", "auto", str(tmp_path / "bad.parquet"),
                               "--out", str(tmp_path / "out.jsonl")], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert f"{tmp_path / 'bad.parquet'}[row group " in done.stderr and "unreadable Parquet row group" in done.stderr
        assert "fix them or pass --skip-bad" in done.stderr  # the tool's own option, not the config key
