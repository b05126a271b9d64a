"""Launch a training run the way a user or a scheduler needs it: `accelerate launch`, plus four things.

1. The config, the model's config and every data record are checked first: a problem is one line and
   exit code 2, and nothing is launched or written.
2. SIGTERM / SIGUSR1 sent to this process go straight to the training processes, which finish their
   step, write a checkpoint together and stop (torchrun would kill them 30 s after its own SIGTERM).
3. Any failure ends with the run's own exit code (2 for a user error, said in one line) and no launcher
   traceback; torchrun's failure summary only for a failure the run did not explain.
4. When the run stopped for preemption, this exits 75 (EX_TEMPFAIL), so a job script can requeue:

  python tools/launch.py --config_file accelerate_configs/zero3.yaml loop/train.py configs/RUN.yaml \\
      --resume_from_checkpoint latest
  [ $? -eq 75 ] && scontrol requeue "$SLURM_JOB_ID"

Everything before the training script is passed to `accelerate launch`; the script and what follows it
are the run's own arguments (a config file and --key value overrides).
"""

from __future__ import annotations

import sys

from loop import launch

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    sys.exit(launch.run(sys.argv[1:]))
