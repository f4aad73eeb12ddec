"""What the training loop needs around its steps: the workdir lock, stop signals, a profiler
window, and the NaN/Inf policy. Kept apart from lm/loop.py so the loop reads top to bottom."""

import contextlib
import fcntl
import os
import signal
import threading

import jax

from lm import metrics
from lm.errors import NonFiniteLoss, UserError


class WorkdirLock:
  """One run at a time in a workdir: a second `lm.main` there would interleave checkpoints
  with the first's or, with --overwrite, delete them under it. Process 0 holds an exclusive
  flock on the workdir folder itself (so locking writes nothing into it) from `acquire()`,
  called as soon as the folder exists, until the run ends, however it ends. A filesystem
  without flock (some network mounts) leaves the run unguarded."""

  def __init__(self, workdir):
    self.workdir, self._fd = workdir, None

  def acquire(self):
    if self._fd is not None or jax.process_index() != 0 or not os.path.isdir(self.workdir):
      return
    fd = os.open(self.workdir, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise UserError(f"--workdir: {self.workdir} is in use by another lm run; wait for it "
                      "to end, or choose another workdir") from None
    except OSError:
      os.close(fd)
      return
    self._fd = fd

  def release(self):
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc_info):
    self.release()


@contextlib.contextmanager
def stop_signals():
  """Turns the first SIGTERM/SIGINT into a flag the loop checks after every step."""
  received = []
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    # Python delivers signals to the main thread only. With several processes, JAX's
    # preemption service catches SIGTERM and all processes agree on the step to stop at
    # (reached_preemption below); a local flag could stop one process alone.
    yield received
    return

  def handler(signum, _):
    received.append(signal.Signals(signum).name)
    signal.signal(signum, previous[signum])  # a second one ends the process at once

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield received
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


class Profiler:
  """A jax.profiler trace of `count` steps from step `first` (past compilation)."""

  def __init__(self, log_dir, first, count):
    self.log_dir, self.first, self.last = log_dir, first, first + count - 1
    self.active = False
    self.enabled = count > 0

  def before(self, step, state):
    if self.enabled and step == self.first:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self.log_dir)
      self.active = True

  def after(self, step, state):
    if self.active and step == self.last:
      jax.block_until_ready(state)
      self.close()
      metrics.log(f"lm: profile of steps {self.first}-{self.last} in {self.log_dir} "
                  "(tensorboard --logdir there, Profile tab)")

  def close(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def check_finite(fetched, policy, last_checkpoint):
  for step, m in fetched:
    if m["nonfinite"] and policy == "stop":
      where = (f"checkpoint {last_checkpoint} is the last good one" if last_checkpoint
               else "no checkpoint was written")
      raise NonFiniteLoss(
          f"step {step}: loss {float(m['loss'])}, gradient norm {float(m['grad_norm'])}: "
          f"not finite; stopped without applying it ({where}). Lower train.learning_rate, "
          "check the data, or set train.nonfinite=skip")
