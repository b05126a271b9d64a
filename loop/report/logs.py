"""The run's log: one logger ("loop") to the console through tqdm (never into the middle of the progress bar)
and, once the run directory is claimed, to train.log; lines meant for one of them only."""

from __future__ import annotations

import logging
import sys


class ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm, so that a log line never lands in the middle of the progress bar."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - as logging.StreamHandler does
            self.handleError(record)


FILE_ONLY = {"only": "file"}  # `extra` for lines that belong in train.log, not on the console
CONSOLE_ONLY = {"only": "console"}


def setup_logging(is_main: bool) -> logging.Logger:
    """Main process logs to the console (and keeps the lines until loop/state/rundir.py opens train.log);
    the others only warn."""
    from logging.handlers import MemoryHandler

    log = logging.getLogger("loop")
    for old in list(log.handlers):  # a previous run in this process (tests, notebooks)
        old.close()
        log.removeHandler(old)
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    console = ConsoleHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    console.addFilter(lambda record: getattr(record, "only", "console") == "console")
    log.addHandler(console)
    if is_main:
        log.addHandler(MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))
    saver = logging.getLogger("accelerate.utils.other")
    if _tied_weights_note not in saver.filters:
        saver.addFilter(_tied_weights_note)
    return log


def _tied_weights_note(record: logging.LogRecord) -> bool:
    """Drop accelerate's warning, at every checkpoint without DeepSpeed, that a weight tied to another (the
    output projection to the token embedding) is stored once: loading ties it again, and resume is
    bit-identical (tests/training/test_step.py), so the line only breaks into the progress bar."""
    return "Removed shared tensor" not in record.getMessage()  # after accelerate's "[RANK 0] "
