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


def test_the_runtime_imports_nothing_from_tools():
    """tools/ (front ends, benchmarks, and the builders of the tiny models and the tool-use set) stands on loop;
    loop never reaches into it, so what serves only tools and tests stays out of the installed package."""
    reaching = [f"{module_name(p)} imports {node.module if isinstance(node, ast.ImportFrom) else node.names[0].name}"
                for p in LOOP.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tools"
                or isinstance(node, ast.Import) and any(a.name.split(".")[0] == "tools" for a in node.names)]
    assert not reaching, reaching


ENGINE_OWN = {"loop.engine.deepspeed", "loop.engine.zero3_files", "loop.engine.plain", "loop.engine.fsdp2",
              "loop.engine.dcp_files"}  # reached via the registry
ZERO3_FILE_NAMES = ("zero_pp_rank", "pytorch_model/", "mp_rank_")


def runtime_sources() -> list[Path]:
    """loop/ outside loop/engine/, and the tools (benchmarks, which measure DeepSpeed itself, aside)."""
    return [p for p in [*LOOP.rglob("*.py"), *(ROOT / "tools").rglob("*.py")]
            if "engine" not in p.relative_to(ROOT).parts[:2] and "bench" not in p.relative_to(ROOT).parts]


def test_only_the_engine_package_imports_deepspeed_or_an_engines_own_modules():
    broken = []
    for path in runtime_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                     if isinstance(node, ast.ImportFrom) and node.module else [])
            broken += [f"{path.relative_to(ROOT)} imports {n}" for n in names
                       if n.split(".")[0] == "deepspeed" or n in ENGINE_OWN]
    assert not broken, broken
    assert len(runtime_sources()) > 40  # the walk saw the package and the tools


def test_no_zero3_file_name_is_spelled_outside_the_engine_package():
    broken = [f"{path.relative_to(ROOT)}: {name!r}" for path in runtime_sources() for name in ZERO3_FILE_NAMES
              if name in path.read_text()]
    assert not broken, broken


def test_every_engine_is_registered_under_its_own_name_and_fills_in_the_whole_interface():
    """The seam a second engine (FSDP2) plugged into: every field of `Engine` and its `Layout` is a function."""
    import dataclasses

    from loop.engine import registry
    from loop.engine.interface import Engine, Layout

    assert registry.DEFAULT == "deepspeed" and set(registry.ENGINES) == {"deepspeed", "fsdp2", "accelerate"}
    for name, engine in registry.ENGINES.items():
        assert engine.name == name
        for f in dataclasses.fields(Engine):
            value = getattr(engine, f.name)  # reshard may be None: checkpoints that resume on their process count only
            assert f.name in ("name", "title", "layout") or callable(value) or (f.name, value) == ("reshard", None) \
                or (f.name == "master_weights" and isinstance(value, bool)), (name, f.name)
        assert all(callable(getattr(engine.layout, f.name)) for f in dataclasses.fields(Layout))
