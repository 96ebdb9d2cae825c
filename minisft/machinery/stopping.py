"""Stopping on request: Ctrl-C, SIGTERM or SIGUSR1 ends a run at a step boundary, with a checkpoint.

Batch schedulers and clouds stop a job with SIGTERM, then wait a grace period before SIGKILL:
SLURM (which can also warn with SIGUSR1 ahead of time: `sbatch --signal=USR1@120`), Kubernetes
(`terminationGracePeriodSeconds`), spot instances. Python's default for SIGTERM is to die at once,
losing every step since the last checkpoint.

While the steps run, these signals only record the request. The loop reads it at the start of each
step, before any forward pass, and under torchrun adds it up over the processes in the all-reduce it
does there anyway (the step's trained-token count). Every process gets the same sum, so all of them
stop before the same step, even when only one of them got the signal, and they write the checkpoint
together. The step under way when the signal came is finished, not lost: give the job a grace period
longer than one step plus one checkpoint write.

A second Ctrl-C in a one-process run stops sooner: it abandons the forward and backward passes of the
step under way (the checkpoint holds the last completed step), but never cuts into the optimizer's
update. Under torchrun a second signal changes nothing: one process abandoning a step alone would
leave the others waiting in the gradient all-reduce. (torchrun itself forwards SIGTERM and SIGINT to
its workers, so each worker may get a signal twice; add SIGUSR1 with `--signals_to_handle`.)

A run stopped so exits with status 75, EX_TEMPFAIL in sysexits.h ("try again later"): a job script
can tell it from success (0), a crash (1), a bad flag or file (2) and a kill (128 + the signal).
Under torchrun rank 0 exits 75 and the others 0 (torchrun ends the whole group as soon as one process
exits non-zero, so rank 0 goes last), and torchrun reports the 75 as a failure and exits 1.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
STOPPED_EXIT_CODE = 75


@dataclass
class StopRequest:
    """What the handler records, for the loop to read."""

    signal: str | None = None  # the first stop signal this process received
    one_process: bool = True  # only then may a second Ctrl-C abandon a step
    in_passes: bool = False  # inside a step's forward and backward passes

    @contextmanager
    def abandonable(self):
        """The forward and backward passes: a second Ctrl-C may cut them short (one process only)."""
        self.in_passes = True
        try:
            yield
        finally:
            self.in_passes = False


@contextmanager
def stop_requests(one_process: bool, speak: bool):
    """Within the block, SIGINT, SIGTERM and SIGUSR1 record a StopRequest instead of ending the process."""
    request = StopRequest(one_process=one_process)

    def record(number, frame):
        if request.signal is None:
            request.signal = signal.Signals(number).name
            if speak:  # os.write: printing through rich from inside a signal handler could tangle its output
                again = "; Ctrl-C again to stop now" if one_process else ""
                os.write(2, f"\n{request.signal}: stopping after this step, with a checkpoint{again}\n".encode())
        elif number == signal.SIGINT and request.one_process and request.in_passes:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield request  # Python lets only the main thread set handlers: the signals keep their usual effect
        return
    previous = {number: signal.signal(number, record) for number in STOP_SIGNALS}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
