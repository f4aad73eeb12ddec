"""Throughput of the train steps between two log lines: tokens/s, ms/step and MFU.

    meter = Meter(example_flops, peak, num_devices, start_step, lambda: trainer.compile_seconds)
    meter.record(steps, step_metrics, batch, lengths)   # after each dispatch
    with meter.pause():                                  # evaluation: not training time
      ...
    reading = meter.read(step)                           # fetches the metrics
    ...                                                  # log it
    meter.restart(step)                                  # the next interval starts

The time between readings leaves out the pauses and the seconds dispatches waited on XLA
compiling. Tokens count padding (it is computed too); FLOPs are the task's per example
(length buckets vary them) against the devices' peak.
"""

import contextlib
import dataclasses
import time

import jax


@dataclasses.dataclass
class Reading:
  steps: list  # [(step, host metrics)] since the last reading
  tokens_per_s: float
  ms_per_step: float
  mfu: float

  @property
  def last(self):
    return self.steps[-1][1]


class Meter:

  def __init__(self, example_flops, peak_flops, num_devices, start_step, compile_seconds):
    """`example_flops(lengths)`: model FLOPs of one row (lm.tasks.Task.example_flops);
    `compile_seconds()`: the compile time so far (lm.programs.Programs)."""
    self._example_flops, self._flops_at = example_flops, {}
    self.peak = peak_flops * num_devices
    self._compile_seconds = compile_seconds
    self._compiled_before = 0.0  # compile seconds already taken out of earlier intervals
    self._last_time, self._last_step = time.perf_counter(), start_step
    self._reset()

  def _reset(self):
    self.pending = []  # (step or range of steps, metrics on device) since the last reading
    self._tokens = self._flops = 0
    self._paused = 0.0

  def record(self, steps, step_metrics, batch, lengths):
    """A dispatch's metrics (still on device): one step (an int) or a range of steps,
    whose batch (one, or `len(steps)` stacked) has rows of these lengths."""
    self.pending.append((steps, step_metrics))
    n = len(steps) if isinstance(steps, range) else 1
    rows, _ = batch.rows_and_length
    if lengths not in self._flops_at:
      self._flops_at[lengths] = self._example_flops(lengths)
    self._tokens += batch.num_tokens
    self._flops += n * rows * self._flops_at[lengths]

  @contextlib.contextmanager
  def pause(self):
    """Time spent in the block is not training time."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - start

  def fetch(self):
    """[(step, host metrics)] of the steps since the last reading (a device transfer)."""
    return per_step(jax.device_get(self.pending))

  def read(self, step):
    """The Reading of the steps since the last restart, up to `step`."""
    fetched = self.fetch()
    now = time.perf_counter()
    compiled = self._compile_seconds() or 0.0
    elapsed = now - self._last_time - self._paused - (compiled - self._compiled_before)
    elapsed = max(elapsed, 1e-9)
    reading = Reading(steps=fetched, tokens_per_s=self._tokens / elapsed,
                      ms_per_step=1000 * elapsed / (step - self._last_step),
                      mfu=self._flops / elapsed / self.peak)
    self._compiled_before = compiled
    return reading

  def restart(self, step):
    """The next interval starts now, after `step` (writing the last reading is not in it)."""
    self._last_time, self._last_step = time.perf_counter(), step
    self._reset()


def per_step(fetched):
  """[(step, metrics)] from pending entries of one step or of a dispatch's range of steps."""
  out = []
  for steps, m in fetched:
    if isinstance(steps, range):
      out.extend((s, {k: v[i] for k, v in m.items()}) for i, s in enumerate(steps))
    else:
      out.append((steps, m))
  return out
