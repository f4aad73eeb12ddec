"""The training loop: data -> train steps -> eval -> checkpoints -> a sample.

`run(config, workdir)` is what `python -m lm.main` calls; config.task.objective says what it
trains (lm/tasks/). Re-running it on the same workdir resumes from the latest complete
checkpoint and continues with the losses an uninterrupted run has. SIGTERM/SIGINT save a
checkpoint at the current step and raise Preempted; a NaN/Inf step raises NonFiniteLoss (or
is skipped, by config) without touching the checkpoints. The checkpoint with the best
validation score is kept in workdir/best (and can end the run early: train.early_stopping).

The pieces: where the run starts (lm/resume.py), the model and steps (lm/train.py), the
throughput meter (lm/meter.py), evaluation, the best checkpoint and early stopping
(lm/selection.py), the final evaluations and sample (lm/evaluation.py).
"""

import contextlib
import dataclasses
import json
import os
import shutil

import jax

from lm import config as config_lib
from lm import evaluation, metrics, resume, sharding, tasks
from lm.checkpoint import Checkpointer
from lm.data import make_data
from lm.errors import Preempted, UserError
from lm.meter import Meter
from lm.models.layers import choose_kernels
from lm.runtime import Profiler, WorkdirLock, check_finite, stop_signals
from lm.selection import Selection
from lm.train import Trainer

WORKDIR_FILES = ("checkpoints", "best", "corrupt_checkpoints", "metrics.jsonl", "tensorboard",
                 "config.json", "profile", "tokenizer.model")


@dataclasses.dataclass
class RunResult:
  workdir: str
  final_step: int
  train_losses: dict  # step -> loss, for the steps that were logged
  eval: dict  # split -> metrics of the final evaluation: the last step's parameters (language
  # models) or the best checkpoint's (tasks)
  sample: str
  best: dict = dataclasses.field(default_factory=dict)  # {"step", "validation"}: best eval
  config: object = None  # the config the run trained (init_from's architecture taken over)


def run(config, workdir, devices=None, stop_after=None, overwrite=False):
  """Trains, evaluates, checkpoints and samples. `stop_after` ends early (as a preemption).

  `overwrite` discards what an earlier run left in `workdir` instead of resuming from it.
  Another run still going in `workdir` is refused (lm/runtime.py, WorkdirLock).
  """
  with WorkdirLock(workdir) as lock:
    return _run(config, workdir, devices, stop_after, overwrite, lock)


def _run(config, workdir, devices, stop_after, overwrite, lock):
  devices = list(jax.devices() if devices is None else devices)
  config_lib.validate(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  choose_kernels(config.model, sharding.platform(mesh))  # one that does not fit: stop now
  metrics.log(f"lm: workdir {os.path.abspath(workdir)}")
  # Nothing is written to (or, with --overwrite, removed from) the workdir until the config,
  # the data and any checkpoint there have been checked.
  found = resume.find(config, workdir, overwrite, len(devices))
  config = found.config  # with init_from's architecture
  t = config.train
  task_type = tasks.get(config.task.objective)
  data = make_data(config, tokenizer_spec=found.tokenizer_spec,
                   windows=task_type.batching.windows)
  found.check_data(data)
  _check_data(config, data, task_type)
  trainer = Trainer(config, data.tokenizer.vocab_size, mesh,
                    task_type.resolve_num_labels(config, data))
  train_dataset = data.train_batches(t.batch_size, config.data.seq_len, t.seed,
                                     jax.process_index(), jax.process_count(),
                                     batching=trainer.task.batching)
  end_step = t.num_steps if stop_after is None else min(t.num_steps, stop_after)
  _compile_ahead(trainer, train_dataset, found.step or 0, end_step)
  start = found.start(trainer)

  os.makedirs(workdir, exist_ok=True)
  lock.acquire()  # before anything is removed or written (a new workdir: now it exists)
  if overwrite and jax.process_index() == 0:
    _discard_earlier_run(workdir)
  meta = _write_run_files(workdir, config, data, trainer.task, start.base)
  checkpointer = found.checkpointer or Checkpointer(workdir, t.keep_checkpoints)
  writer = metrics.MetricWriter(workdir, resume_step=start.step)
  selection = Selection(trainer, data, config, workdir, writer, start.best)
  meter = _start_meter(config, data, trainer, mesh, start)
  if selection.stopped_early:  # a rerun of a run that stopped early does not train on
    end_step = start.step
  profiler = Profiler(os.path.join(workdir, "profile"), start.step + 3, t.profile_steps)
  loop = _Loop(trainer, checkpointer, selection, meter, writer, profiler, meta,
               data.iterator(train_dataset, state=start.data_state))
  failing = False
  try:
    state, step = loop.train(start.state, start.step, end_step)
    final, sample = {}, ""
    if step == t.num_steps or selection.stopped_early:
      final = selection.final(state, step)
      if config.sample.num_tokens and trainer.task.ends_with_sample:
        sample = evaluation.sample_text(config, data, trainer, state, writer, step)
  except BaseException:
    failing = True
    raise
  finally:
    profiler.close()
    # A metrics flush that fails too (a full disk fails both) must not hide the first error.
    with contextlib.suppress(Exception) if failing else contextlib.nullcontext():
      writer.close()
    with contextlib.suppress(Exception):  # an earlier error says more
      checkpointer.close()
      selection.close()
  return RunResult(workdir=workdir, final_step=step, train_losses=loop.train_losses,
                   eval=final, sample=sample, best=selection.best or {}, config=config)


class _Loop:
  """The steps from a start to an end: dispatches, log lines, evaluations, checkpoints."""

  def __init__(self, trainer, checkpointer, selection, meter, writer, profiler, meta, batches):
    self.trainer, self.checkpointer, self.selection = trainer, checkpointer, selection
    self.meter, self.writer, self.profiler, self.meta = meter, writer, profiler, meta
    self.batches = batches  # the train data's iterator
    self.t = trainer.config.train
    self.train_losses = {}  # step -> loss, of the steps fetched for log lines

  def train(self, state, step, end_step):
    """(state, step) at the end: end_step, a preemption (raised), or early stopping."""
    t, last_checkpoint = self.t, step
    with stop_signals() as stop_signal:
      while step < end_step:
        first, step = step + 1, _dispatch_end(step, end_step, t, self.profiler)
        self.profiler.before(first, state)
        state = self._dispatch(state, first, [next(self.batches) for _ in range(step - first + 1)])
        self.profiler.after(step, state)
        preempted = bool(stop_signal) or (jax.process_count() > 1 and
                                          self.checkpointer.manager.reached_preemption(step))
        if step % t.log_every == 0 or step == end_step or preempted:
          self._log(step, last_checkpoint)
        if self.selection.due(step, preempted):
          jax.block_until_ready(state)  # so the pause excludes queued train steps
          with self.meter.pause():
            self.selection.evaluate(step, state, self.meta)
        stopped_early = self.selection.stopped_early
        if step % t.checkpoint_every == 0 or step == end_step or preempted or stopped_early:
          check_finite(self.meter.fetch(), t.nonfinite, last_checkpoint)
          # Every process's iterator is at the same batch index, so the primary's state (the
          # one Orbax writes) restores every process.
          best = self.selection.best
          self.checkpointer.save(step, state, {**self.meta, "best": best and dict(best),
                                               "data_state": self.batches.get_state()})
          last_checkpoint = step
        if preempted:
          self.checkpointer.wait()
          raise Preempted(step, stop_signal[0] if stop_signal else "preemption notice")
        if stopped_early:
          break
    self.checkpointer.wait()
    self.selection.wait()
    return state, step

  def _dispatch(self, state, first, host_batches):
    """Trains on the host batches (steps first, first + 1, ...): the new state."""
    task = self.trainer.task
    for batch, size in _dispatches(self.trainer, host_batches):
      if size:  # stacked: [size, B, ...]
        state, step_metrics = self.trainer.train_steps(state, batch)
        steps = range(first, first + size)
      else:
        state, step_metrics = self.trainer.train_step(state, batch)
        steps = first
      self.meter.record(steps, step_metrics, batch, task.batch_lengths(batch))
      first += size or 1
    return state

  def _log(self, step, last_checkpoint):
    reading = self.meter.read(step)
    check_finite(reading.steps, self.t.nonfinite, last_checkpoint)
    for s, m in reading.steps:
      self.train_losses[s] = float(m["loss"])
    last = reading.last
    self.writer.write(step, {"train/loss": last["loss"], "train/grad_norm": last["grad_norm"],
                             "train/learning_rate": last["learning_rate"],
                             "train/skipped_steps": last["skipped"],
                             **({"train/loss_scale": last["loss_scale"]}
                                if "loss_scale" in last else {}),
                             "perf/tokens_per_s": reading.tokens_per_s,
                             "perf/ms_per_step": reading.ms_per_step, "perf/mfu": reading.mfu})
    skipped = f" | skipped {int(last['skipped'])}" if last["skipped"] else ""
    metrics.log(f"step {step:>6} | loss {float(last['loss']):.4f} | "
                f"{reading.tokens_per_s:,.0f} tok/s | {reading.ms_per_step:.1f} ms/step | "
                f"MFU {reading.mfu:.2%}{skipped}")
    self.meter.restart(step)


def _check_data(config, data, task_type):
  if config.model.vocab_size is not None and config.model.vocab_size < data.tokenizer.vocab_size:
    raise UserError(f"config.model.vocab_size: {config.model.vocab_size} is smaller than the "
                    f"tokenizer's vocabulary ({data.tokenizer.vocab_size})")
  if data.format not in task_type.data_formats:
    raise UserError(f"config.task.objective: {task_type.name} trains on a "
                    f"{' or '.join(task_type.data_formats)} dataset; {data.source} is a "
                    f"{data.format} dataset (config.data.format)")
  if data.size("validation") < (2 if data.streams else 1):
    raise UserError(f"config.data.validation_fraction: no {'text' if data.streams else 'data'} "
                    f"of {data.source} landed in the "
                    "validation split (folders are split by whole documents); raise the "
                    "fraction or add documents")


def _compile_ahead(trainer, train_dataset, begin, end_step):
  batching = trainer.task.batching
  if batching.windows and not batching.bucketed and begin < end_step:
    # Every batch has one shape: the first dispatch's train step compiles on a background
    # thread while the state is initialised or restored.
    t = trainer.config.train
    first = _dispatch_end(begin, end_step, t, Profiler(None, begin + 3, t.profile_steps))
    trainer.compile_ahead(train_dataset[0], first - begin)


def _discard_earlier_run(workdir):
  for name in WORKDIR_FILES:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def _write_run_files(workdir, config, data, task, base):
  """The metadata every checkpoint carries; config.json (and a SentencePiece
  tokenizer.model, usable by other tools too) in the workdir."""
  meta = {"config": config.to_dict(), "tokenizer": data.tokenizer.to_dict(),
          "data_fingerprint": data.fingerprint, "base": base,
          "num_labels": task.num_labels, "label_names": list(data.prepared.label_names)}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(meta["config"], f, indent=2)
    if hasattr(data.tokenizer, "model_proto"):
      with open(os.path.join(workdir, "tokenizer.model"), "wb") as f:
        f.write(data.tokenizer.model_proto)
  return meta


def _start_meter(config, data, trainer, mesh, start):
  """The Meter of this run, after the start's log lines: data, model, FLOPs, MFU peak."""
  task, seq_len = trainer.task, config.data.seq_len
  share = metrics.CAUSAL_ATTENTION_SHARE[config.log.attention_flops]
  example_flops = lambda lengths: task.example_flops(
      trainer.abstract_params, trainer.abstract_frozen, lengths, causal_share=share)
  flops_per_token = example_flops(task.nominal_lengths(seq_len)) / seq_len
  peak, peak_source = metrics.peak_flops_per_device(config.model.dtype, config.log.peak_flops)
  unit = "tokens" if data.streams else "examples"
  metrics.log(f"lm: data {data.source}: train {data.size('train'):,} / validation "
              f"{data.size('validation'):,} / test {data.size('test'):,} {unit}, "
              f"{data.tokenizer.kind} tokenizer, vocab {trainer.model_cfg.vocab_size}")
  trains = (f" ({trainer.num_trainable:,} trainable, "
            f"{trainer.num_trainable / trainer.num_params:.2%}: peft {config.peft.method})"
            if config.peft.method else "")
  metrics.log(f"lm: {task.name} model {trainer.num_params:,} parameters{trains}, "
              f"{flops_per_token * config.train.batch_size * seq_len / 1e9:.2f} GFLOP per "
              f"step; mesh {dict(mesh.shape)}; {trainer.model_cfg.kernels} kernels "
              f"(model.kernels={config.model.kernels}); MFU against {peak / 1e9:,.0f} GFLOP/s a device "
              f"({peak_source}); "
              f"{metrics.describe_attention_flops(config.log.attention_flops)}")
  if start.step:
    metrics.log(f"lm: resumed from step {start.step}")
  return Meter(example_flops, peak, mesh.devices.size, start.step,
               lambda: trainer.compile_seconds)


def _dispatch_end(step, end_step, t, profiler):
  """The last step of the dispatch that follows `step`: at most train.steps_per_dispatch
  steps, on a grid of its multiples (the same dispatches after a resume), ending at every
  step that logs, evaluates or checkpoints, and around the profiled steps."""
  n = t.steps_per_dispatch
  last = min(end_step, (step // n + 1) * n)
  for every in (t.log_every, t.eval_every, t.checkpoint_every):
    last = min(last, (step // every + 1) * every)
  if profiler.enabled:
    for edge in (profiler.first - 1, profiler.last):
      if edge > step:
        last = min(last, edge)
  return last


def _dispatches(trainer, host_batches):
  """(batch on the mesh, n): the host batches stacked into one dispatch of n steps where
  they are alike in shape, else one at a time (n = 0: a plain batch)."""
  shapes = {tuple(sorted((k, v.shape) for k, v in b.items())) for b in host_batches}
  if len(host_batches) > 1 and len(shapes) == 1:
    return [(trainer.shard_batches(host_batches), len(host_batches))]
  return [(trainer.shard_batch(b), 0) for b in host_batches]
