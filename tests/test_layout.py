"""The package's layout holds: config is the ground floor, no import circle anywhere (imports inside functions
and TYPE_CHECKING blocks counted), and each stage imports only what its docstring says it may."""

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

LOOP = ROOT / "loop"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def exists(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(path: Path) -> set[str]:
    """Every module of `loop` that this file imports, wherever in the file the import is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "loop"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "loop":
            for alias in node.names:  # `from loop.data import batches` imports the module loop.data.batches
                child = f"{node.module}.{alias.name}"
                found.add(child if exists(child) else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imported(p) - {module_name(p)} for p in LOOP.rglob("*.py")}


def stage(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def allowed() -> dict[str, set[str]]:
    """Each stage's 'May import:' line, from its package (or module) docstring."""
    rules = {}
    for path in [*LOOP.glob("*/__init__.py"), *LOOP.glob("*.py")]:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        line = next((chunk for chunk in doc.split("\n\n") if chunk.startswith("May import:")), None)
        if line is not None:
            rules[stage(module_name(path)) or path.stem] = set(re.findall(r"\bloop\.(\w+)", line))
    return rules


def test_no_import_circle_anywhere_in_loop():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            assert state.get(nxt) != "open", f"import circle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert len(edges) > 30  # the walk saw the whole package


def test_every_stage_imports_only_the_stages_its_docstring_allows():
    rules = allowed()
    assert rules["config"] == set() and rules["data"] == {"config"}  # the ground floor, and what stands on it
    assert {"processes", "engine", "model", "training", "state", "report", "inference", "launch"} <= set(rules)
    broken = [f"{module} imports {target}" for module, targets in graph().items() if stage(module) in rules
              for target in targets if stage(target) != stage(module) and stage(target) not in rules[stage(module)]]
    assert not broken, broken


def test_the_config_imports_neither_torch_nor_transformers():
    code = ("import sys, loop.config; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'accelerate', 'deepspeed', 'datasets')]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    assert not {m for m in graph()["loop.config"] | graph()["loop.config.settings"] if stage(m) != "config"}
