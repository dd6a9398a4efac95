"""Stopping on a scheduler's signal: on SIGTERM or SIGUSR1 (SLURM sends one before it kills a job, and
`sbatch --signal` ahead of the time limit) every rank finishes its current optimizer step, the run saves a
complete checkpoint at that step, logs it and exits with status 75 (EX_TEMPFAIL: re-run the same command to
continue; torchrun itself exits with 1 then: the log says what happened). A second signal while
stopping is logged and ignored, so that it cannot cut the save short: the time to exit is the rest of one
optimizer step plus one save. A signal before training starts ends the process as usual (nothing to save).

Ranks agree on the step to stop at: after every optimizer step they all-reduce their "signal received" flags on
a CPU (gloo) process group, so no rank relies on the signal reaching every process at once, and the check is a
small message between hosts without a GPU synchronisation (an all-reduce on the GPU would need one to read its
result; checking only every few steps would add those steps to the time before the save). One process reads
its own flag. The training data loader's worker processes ignore both signals (a scheduler signals every
process of the job, and a loader worker that dies ends the run at once); their process stops them."""
import contextlib
import logging
import os
import signal
import traceback
from functools import partial

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_STATUS = 75


def ignore_signals(worker_init_fn, worker_id):
    """In a data loader worker, after torch's set-up (which ends the worker on a SIGTERM from any other process)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


class StopOnSignal(TrainerCallback):
    def __init__(self):
        self.received = None    # name of the first signal this process received
        self.stopped_at = None  # the step all ranks stopped at
        self.group = self.previous_handlers = None
        self.distributed = False

    def receive(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
        else:  # a signal handler may interrupt logging, which is not reentrant: a plain write
            os.write(2, f"{name} again: ignored, the run is already stopping at its next step end\n".encode())

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # from here on there is progress to save; a signal during set-up ends the process as usual
        self.previous_handlers = {sig: signal.signal(sig, self.receive) for sig in SIGNALS}
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)  # torch's, inside accelerate's
        if loader is not None and loader.num_workers > 0:
            loader.worker_init_fn = partial(ignore_signals, loader.worker_init_fn)
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed and "gloo" not in str(dist.get_backend()):
            self.group = dist.new_group(backend="gloo")

    def agreed(self):
        """Whether any rank received a signal; the same answer on every rank."""
        if not self.distributed:
            return self.received is not None
        flag = torch.tensor([self.received is not None], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and self.agreed():
            self.stopped_at = state.global_step
            control.should_save = control.should_training_stop = True
            control.should_evaluate = False  # the grace time goes to the save
            if state.is_world_process_zero:
                logger.warning("%s: stopping after step %d to save checkpoint-%d", self.received or "signal on another rank",
                               state.global_step, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.stopped_at and state.is_world_process_zero:
            logger.warning("saved %s at step %d; exiting with status %d: re-run the same command to continue",
                           os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), state.global_step,
                           EXIT_STATUS)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_handlers()

    def restore_handlers(self):
        """Signals end the process again, unless it is stopping on one (the save must not be cut short)."""
        if self.stopped_at is None and self.previous_handlers:
            for sig, handler in self.previous_handlers.items():
                signal.signal(sig, handler)
            self.previous_handlers = None

    @contextlib.contextmanager
    def training(self):
        """Around trainer.train(): an error in training (which skips on_train_end) gives the signals back too, and
        clears the failed frames. Their locals hold the data loader's iterator, which the traceback would keep
        alive; the interpreter's exit would then end its workers with SIGTERM, which they ignore, and wait for ever.
        Freed now, the iterator ends them."""
        try:
            yield
        except BaseException as error:
            traceback.clear_frames(error.__traceback__)
            raise
        finally:
            self.restore_handlers()

    def exit_if_stopped(self, trainer):
        """After trainer.train(): exit with EXIT_STATUS once every rank is done, if the run stopped on a signal."""
        if self.stopped_at is not None:
            trainer.accelerator.wait_for_everyone()
            raise SystemExit(EXIT_STATUS)
