"""Exit codes of `hybridtron train` that a scheduler or a wrapper script can act on.

0    finished (max_steps or trainer.stop_at_step)
1    an error, printed as one line (a config, data, checkpoint or disk problem)
2    a command line or config file that cannot be read
75   stopped by a signal before a checkpoint of the current step was written (a second
     SIGTERM, or one that arrived while a rank could not act on it): completed checkpoints
     are kept, and the same command resumes from the newest, repeating the steps after it
     (EX_TEMPFAIL of sysexits.h: "try again later")
130  interrupted (Ctrl-C)
143  pre-empted (SIGTERM, SIGUSR1 or the PREEMPT notice): every rank wrote the checkpoint of
     the step it stopped at; the same command resumes with nothing lost (128 + SIGTERM, what
     Slurm, torchrun and Kubernetes report for a job that ended on SIGTERM)
"""

from __future__ import annotations

import signal

FINISHED = 0
PREEMPTED = 128 + signal.SIGTERM  # 143: checkpointed the current step, then stopped
STOPPED_WITHOUT_CHECKPOINT = 75  # EX_TEMPFAIL: stopped by a signal, newest checkpoint older
INTERRUPTED = 130

# Signals that ask a job to stop (a rank ended by one did not finish its checkpoint).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
