"""The test tiers, found from what a test does, so that a new test is tiered right without anyone remembering a
marker: a test is `slow` when it, a fixture it uses, or a function of its own module or of a conftest.py that
either calls (however deep), launches processes or trains: `launch(...)` (accelerate with real ZeRO-3),
`run_in_process(...)` (a whole run of loop/train.py in this process), `subprocess.Popen`, or a command line
naming the launcher, loop/train.py, tools/launch.py, a GPU script's toy run (--tiny) or torchrun's module. An explicit
`@pytest.mark.slow` adds what this cannot see. `python -m pytest -m "not slow"` is then the quick tier; plain
`python -m pytest` runs every tier.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

TESTS = Path(__file__).resolve().parent
LAUNCHERS = {"launch", "run_in_process", "Popen"}
# --tiny: a GPU script at toy size; torch.distributed.run: a script of the tests' own on several processes
COMMANDS = ("accelerate.commands.launch", "train.py", "tools/launch.py", "--tiny", "torch.distributed.run")


def _body(node: ast.FunctionDef) -> list[ast.AST]:
    """The function's nodes without its docstring (which may name a command it does not run)."""
    skip = node.body[0] if node.body and isinstance(node.body[0], ast.Expr) and isinstance(
        getattr(node.body[0], "value", None), ast.Constant) else None
    return [n for stmt in node.body if stmt is not skip for n in ast.walk(stmt)]


@functools.cache
def _functions(path: Path) -> dict[str, tuple[bool, frozenset[str]]]:
    """Each top-level function of a file: (whether it launches by itself, the names it calls or names in a string,
    as a fixture looked up by name)."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            nodes = _body(node)
            calls = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
                     for n in nodes if isinstance(n, ast.Call)}
            calls |= {n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)
                      and n.value.isidentifier()}  # request.getfixturevalue("trained_run") uses that fixture
            named = any(isinstance(n, ast.Constant) and isinstance(n.value, str) and any(c in n.value for c in COMMANDS)
                        for n in nodes)
            found[node.name] = (bool(calls & LAUNCHERS) or named, frozenset(calls))
    return found


def launches(path: Path, name: str) -> bool:
    """Whether function `name` of test file `path` launches, directly or through functions of its file or of the
    conftest.py files above it."""
    scopes = [path, *(d / "conftest.py" for d in path.parents if d.is_relative_to(TESTS))]
    table = {}
    for scope in reversed([s for s in scopes if s.is_file()]):  # the nearest definition wins
        table |= _functions(scope)
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen or current not in table:
            continue
        seen.add(current)
        direct, calls = table[current]
        if direct:
            return True
        todo.extend(calls)
    return False


def is_slow(item) -> bool:
    """Whether a collected test (or any fixture of tests/ it uses) launches processes or trains."""
    info = getattr(item, "_fixtureinfo", None)
    functions = [getattr(item, "function", None), *(d.func for defs in (info.name2fixturedefs.values() if info else ())
                                                       for d in defs)]
    for f in functions:
        code = getattr(f, "__code__", None)
        if code is not None and Path(code.co_filename).is_relative_to(TESTS) and \
                launches(Path(code.co_filename), f.__name__):
            return True
    return False
