"""The docs a newcomer walks hold together (issue 35.7): every relative link in README.md, CONTRIBUTING.md,
CHANGELOG.md and docs/ leads to a file (and heading) that exists, README.md stays short, and its set-up
commands are the ones CI runs: command 2 is `.ci/run`'s lines, command 1 installs the same torch and names
only files and flags that exist. Reads text only: no model, no launch."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```+|~~~+)[^`]*$")  # a fence's info string holds no backtick (CommonMark)
LINK = re.compile(r"(?<!\\)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code blanked (a link or heading there is not one)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"(`+)(?:(?!\1).)+\1", "``", line))
    return lines


def anchors(page: Path) -> set[str]:
    """The #anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    lines, fenced = [], False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    for line in lines:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def relative_links(page: Path) -> list[str]:
    return [t for line in prose(page.read_text()) for t in LINK.findall(line)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not checked offline


def test_the_pages_exist():
    for page in PAGES[:3]:
        assert page.is_file(), f"{page.name} is missing"
    assert len(PAGES) > 8, "docs/ holds the topics the README leaves out"
    assert (ROOT / "LICENSE").is_file() and "Apache License" in (ROOT / "LICENSE").read_text()[:200]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert relative_links(ROOT / "README.md"), "the link finder finds the README's links"
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading makes #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    """The check above could pass by finding nothing: it finds a missing file and a missing heading."""
    (tmp_path / "other.md").write_text("# A heading: with `code`\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading-with-code) [gone](nope.md) [bad](other.md#not-a-heading)\n"
                    "`[in code](nope.md)` [web](https://example.com/x)\n")
    targets = relative_links(page)
    assert targets == ["other.md#a-heading-with-code", "nope.md", "other.md#not-a-heading"]
    assert anchors(tmp_path / "other.md") == {"a-heading-with-code"}


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move a topic into docs/"


def setup_blocks() -> list[list[str]]:
    """The bash blocks of the README's set-up section (from its '## Set-up' heading to the next '## ')."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Set-up.*?$(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, "README.md has a '## Set-up' section"
    return [block.strip().splitlines() for block in re.findall(r"^```bash\n(.*?)^```", section.group(1), re.S | re.M)]


def ci_lines() -> list[str]:
    """The commands .ci/run runs, less what only CI needs around them (the shebang, `set -euo pipefail`, and
    the `cd` to the repository root the README's reader is already in)."""
    keep = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        code = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if code and not code.startswith(("set -", "cd ")):
            keep.append(code)
    return keep


def test_the_setup_section_has_the_two_commands():
    assert len(setup_blocks()) == 2, "the set-up section shows command 1 and command 2, and nothing else to run"


def test_command_2_is_what_ci_runs():
    readme = [line.split(" #")[0].strip() for line in setup_blocks()[1]]
    assert readme == ci_lines(), "README.md's command 2 and .ci/run must run the same lines"
    assert any("pytest" in line for line in readme) and not any(" -m " in line.split("pytest", 1)[-1]
                                                                for line in readme), "CI runs every tier"


def launch_and_train(words: list[str]) -> None:
    """What tools/launch.py is given is what accelerate launch takes, then loop/train.py, a config that exists and
    --key value overrides that config reads (so a renamed setting fails here, not in a user's first command)."""
    from accelerate.commands.launch import launch_command_parser

    from loop import config

    launch = launch_command_parser().parse_args(words)
    assert launch.training_script == "loop/train.py" and (ROOT / launch.config_file).is_file()
    run_config, *overrides = launch.training_script_args
    config.from_argv([str(ROOT / run_config), *overrides])


def test_command_1_installs_what_ci_installs_and_names_what_exists():
    (line,) = setup_blocks()[0]
    steps = [shlex.split(step) for step in line.split(" && ")]
    assert steps[0] == ["python3", "-m", "venv", ".venv"]
    pin = re.search(r"torch==\S+", "\n".join(ci_lines()))
    assert pin and pin.group(0) in line, "command 1 installs the torch that CI tests"
    named = [w for step in steps for w in step if re.match(r"^[\w./-]+\.(py|ya?ml)$", w)]
    assert "configs/quickstart.yaml" in named
    for path in named:
        assert (ROOT / path).is_file(), f"command 1 names {path}, which does not exist"
    for step in steps:  # every --flag a tool is given is one it declares
        script = next((w for w in step if w.startswith("tools/") and w.endswith(".py")), None)
        if script == "tools/launch.py":  # accelerate launch's options, the training script, its config's overrides
            launch_and_train(step[step.index(script) + 1:])
        elif script:
            source = (ROOT / script).read_text()
            for flag in (w.split("=")[0] for w in step[step.index(script) + 1:] if w.startswith("--")):
                assert f'"{flag}"' in source, f"command 1 gives {script} {flag}, which it does not declare"
    output_dir = re.search(r"^\s*output_dir:\s*(\S+)", (ROOT / "configs" / "quickstart.yaml").read_text(), re.M)
    assert output_dir and f"{output_dir.group(1)}/checkpoints" in line, "command 1 reads the run's own output"


def code_text(page: Path) -> list[str]:
    """What a page shows as code: its fenced blocks' lines and its inline code spans."""
    found, fenced = [], False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            found.append(line)
        else:
            found += [m.group(2) for m in re.finditer(r"(`+)((?:(?!\1).)+)\1", line)]
    return found


def test_every_path_the_docs_name_exists():
    """A file or folder of the repository named as code (`loop/train.py`, `tests/test_launch.py`) exists, so a
    move or rename that leaves the docs behind fails here. Placeholders in capitals (`configs/RUN.yaml`) pass."""
    tree = re.compile(r"(?<![\w/.~-])((?:loop|tools|tests|configs|accelerate_configs|docs)/[\w./-]*)")
    missing = set()
    for page in PAGES:
        for code in code_text(page):
            for path in (p.rstrip(".") for p in tree.findall(code)):
                if not re.search(r"/[A-Z_]+(\.|/|$)", path) and not (ROOT / path).exists():
                    missing.add(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, "named in the docs but not in the repository: " + ", ".join(sorted(missing))


def test_the_architecture_page_shows_the_stage_table_and_rules_the_package_docstring_holds():
    """docs/architecture.md repeats loop/__init__.py's stage table and "where a change goes" word for word, so a
    change to the layout cannot leave the page behind."""
    import ast

    doc = ast.get_docstring(ast.parse((ROOT / "loop" / "__init__.py").read_text()))
    page = (ROOT / "docs" / "architecture.md").read_text()
    table = next(chunk for chunk in doc.split("\n\n") if chunk.lstrip().startswith("config "))
    assert "\n".join(line[4:] for line in table.splitlines()) in page
    rules = doc[doc.index("Where a change goes:"):].split("\n", 1)[1].strip()
    assert rules in page


def test_the_readme_shows_exactly_the_questions_the_quickstart_holds_out():
    """The quickstart's held-out questions (checked to be on the eval side, by first question, in
    tests/data/test_dialogues.py) are the ones README.md quotes, so the README cannot show a trained question."""
    from tests.data.test_dialogues import QUICKSTART_HELD_OUT

    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"The questions: (.*?)\(`tests/data/test_dialogues.py`", readme, re.S).group(1)
    assert [" ".join(q.split()) for q in re.findall(r'"([^"]+)"', shown)] == list(QUICKSTART_HELD_OUT)
