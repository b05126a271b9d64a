"""The shipped tool-use set: what make_tool_data.py writes, valid, with every tool result computed for real."""

import subprocess
import sys

import pytest

from loop.data import calls
from loop.data.dialogues import load_dialogues
from tests.conftest import ROOT
from tools.builders import toolset


@pytest.mark.parametrize("expression, value", [
    ("17 * 23", "391"), ("(3 + 4) * 2", "14"), ("10 / 4", "2.5"), ("-2 ** 3", "-8"), ("7 // 2 % 3", "0"),
    ("1 / 0", "error: division by zero"), ("__import__('os')", "error: not arithmetic"), ("9 ** 99", "error")])
def test_the_calculator_computes_arithmetic_and_nothing_else(expression, value):
    assert toolset.calculate(expression).startswith(value)


def test_the_shipped_set_is_what_the_tool_writes_valid_and_its_results_real(tmp_path):
    proc = subprocess.run([sys.executable, "tools/make_tool_data.py", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("tool_use.jsonl", "tools.json"):
        assert (tmp_path / name).read_bytes() == (toolset.SHIPPED / name).read_bytes(), name  # deterministic
    dialogues, report = load_dialogues([str(toolset.SHIPPED / "tool_use.jsonl")], "messages", "error")
    assert len(dialogues) == 400 and not report.skipped
    made = 0
    for d in dialogues:
        messages, tools = calls.split(d)
        assert tools == toolset.TOOLS
        for m, result in zip(messages, messages[1:]):
            for c in m.get("tool_calls") or []:
                made += 1
                assert result["content"] == toolset.RUN[c["function"]["name"]](c["function"]["arguments"])
    assert made > 300  # most dialogues call a tool; the others answer a greeting without one
