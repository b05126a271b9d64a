"""One process of a 2-process gloo group (RANK, WORLD_SIZE, MASTER_PORT in its environment) that runs
rundir.check_shared on the relative directory `out`, from the working directory given for its rank: the same
one for both sees one folder, two different ones see two. Prints "shared" or the refusal's one line."""

import os
import sys
from pathlib import Path

from accelerate import Accelerator

from loop.config import ConfigError
from loop.state import rundir

os.chdir(sys.argv[1 + int(os.environ["RANK"])])
accelerator = Accelerator(cpu=True)
if accelerator.is_main_process:
    Path("out").mkdir(exist_ok=True)  # as rundir.claim does
try:
    rundir.check_shared(Path("out"), accelerator)
    print("shared")
except ConfigError as e:
    print(f"error: {e}")
accelerator.end_training()
