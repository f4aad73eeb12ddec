"""The training loop: data -> train steps -> eval -> checkpoints -> a sample.

`run(config, workdir)` is what `python -m lm.main` calls; config.task.objective says what it
trains (lm/tasks/). Re-running it on the same workdir resumes from the latest complete
checkpoint and continues with the losses an uninterrupted run has. SIGTERM/SIGINT save a
checkpoint at the current step and raise Preempted; a NaN/Inf step raises NonFiniteLoss (or
is skipped, by config) without touching the checkpoints. The checkpoint with the best
validation score is kept in workdir/best (and can end the run early: train.early_stopping).
"""

import contextlib
import dataclasses
import json
import os
import shutil
import time

import jax

from lm import config as config_lib
from lm import evaluation, metrics, pretrained, sharding, tasks
from lm.checkpoint import Checkpointer, config_differences
from lm.data import make_data
from lm.errors import Preempted, UserError
from lm.runtime import Profiler, WorkdirLock, check_finite, stop_signals
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


def _latest_meta(checkpointer, config):
  """(step, meta) of the newest readable checkpoint, checked to belong to this config."""
  for step in checkpointer.all_steps():
    try:
      meta = checkpointer.read_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      metrics.log(f"lm: warning: {checkpointer.quarantine(step, e)}")
      continue
    if config.init_from:  # the architecture came from the pretrained run: keep it
      pretrained.adopt_architecture(config, meta["config"])
    changed = config_differences(meta["config"], config.to_dict())
    if changed:
      raise UserError(f"workdir {checkpointer.workdir} holds a checkpoint of a different "
                      f"config ({'; '.join(changed)}); use another --workdir, or --overwrite "
                      "to discard it")
    return step, meta
  return None, None


def _restore(checkpointer, trainer, newest):
  """The newest checkpoint at or before `newest` that restores completely."""
  abstract = sharding.abstract_like(trainer.abstract_state, trainer.state_shardings)
  for step in checkpointer.all_steps():
    if step > newest:
      continue
    try:
      checkpointer.check_shapes(step, trainer.abstract_state)
      return step, checkpointer.restore_state(step, abstract)
    except UserError:
      raise  # readable, but for another model: the user must choose
    except Exception as e:  # pylint: disable=broad-except
      metrics.log(f"lm: warning: {checkpointer.quarantine(step, e)}")
  return None, None


def _discard_earlier_run(workdir):
  for name in WORKDIR_FILES:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def _check_data(config, data, task):
  if data.format not in task.data_formats:
    raise UserError(f"config.task.objective: {task.objective} trains on a "
                    f"{' or '.join(task.data_formats)} dataset; {data.source} is a "
                    f"{data.format} dataset (config.data.format)")
  if data.size("validation") < (2 if data.streams else 1):
    raise UserError(f"config.data.validation_fraction: no {'text' if data.streams else 'data'} "
                    f"of {data.source} landed in the "
                    "validation split (folders are split by whole documents); raise the "
                    "fraction or add documents")


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
  t = config.train
  metrics.log(f"lm: workdir {os.path.abspath(workdir)}")
  # Nothing is written to (or, with --overwrite, removed from) the workdir until the config,
  # the data and any checkpoint there have been checked.
  checkpointer = start_step = meta = source = None
  if not overwrite and os.path.isdir(os.path.join(workdir, "checkpoints")):
    checkpointer = Checkpointer(workdir, t.keep_checkpoints)
    start_step, meta = _latest_meta(checkpointer, config)
  if config.init_from and meta is None:
    source = pretrained.open_pretrained(config.init_from)
    changes = pretrained.adopt_architecture(config, source.meta["config"])
    if changes:
      metrics.log(f"lm: architecture of init_from: {', '.join(changes)}")
    config_lib.validate(config, len(devices))

  tokenizer_spec = meta["tokenizer"] if meta else source.meta["tokenizer"] if source else None
  task_type = tasks.get(config.task.objective)
  data = make_data(config, tokenizer_spec=tokenizer_spec, windows=task_type.batching.windows)
  if meta and meta["data_fingerprint"] != data.fingerprint:
    raise UserError(f"config.data: the corpus at {data.source} changed since the checkpoint "
                    "in this workdir was written; resuming would train on other data")
  if config.model.vocab_size is not None and config.model.vocab_size < data.tokenizer.vocab_size:
    raise UserError(f"config.model.vocab_size: {config.model.vocab_size} is smaller than the "
                    f"tokenizer's vocabulary ({data.tokenizer.vocab_size})")
  trainer = Trainer(config, data.tokenizer.vocab_size, mesh,
                    task_type.resolve_num_labels(config, data))
  task = trainer.task
  _check_data(config, data, task)
  train_dataset = data.train_batches(t.batch_size, config.data.seq_len, t.seed,
                                     jax.process_index(), jax.process_count(),
                                     batching=task.batching)
  begin = start_step or 0
  end_step = t.num_steps if stop_after is None else min(t.num_steps, stop_after)
  if task.batching.windows and not task.batching.bucketed and begin < end_step:
    # Every batch has one shape: the first dispatch's train step compiles on a background
    # thread while the state is initialised or restored.
    first = _dispatch_end(begin, end_step, t, Profiler(None, begin + 3, t.profile_steps))
    trainer.compile_ahead(train_dataset[0], first - begin)
  state = None
  data_state = None
  if start_step is not None:
    newest = start_step
    start_step, state = _restore(checkpointer, trainer, newest)
    if state is None:
      metrics.log("lm: warning: no checkpoint in the workdir could be restored; starting over")
    else:
      if start_step != newest:  # fell back to an older checkpoint: its own data position
        meta = checkpointer.read_meta(start_step)
      data_state = meta.get("data_state")
      if data_state is None:
        raise UserError(f"checkpoint {start_step} in {workdir} has no data pipeline state; "
                        "it was written by an older lm and cannot resume exactly")
  best = meta.get("best") if state is not None else None  # {"step", "validation", "bad_evals"}
  base = meta.get("base") if state is not None else None  # the init_from checkpoint
  if state is None:
    if config.init_from and source is None:  # a restart of a run that began from init_from
      source = pretrained.open_pretrained(config.init_from)
    initial = trainer.init_state()
    if source is not None:
      tensors = source.read(sharding.replicated(mesh))
      base = pretrained.describe_base(source, tensors)
      params = pretrained.load_params(source, jax.device_get(trainer.full_params(initial.params)),
                                      task.head_keys, sharding.replicated(mesh), tensors)
      del tensors
      initial = trainer.state_from_params(params)
    state, start_step = initial, 0
  elif trainer.frozen is None:  # a resumed PEFT run: its checkpoints hold no frozen base
    if base is None:
      raise UserError(f"checkpoint {start_step} in {workdir} has no pointer to its base "
                      "checkpoint (config.init_from); it cannot be resumed")
    tensors = pretrained.read_base(base, sharding.replicated(mesh))
    trainer.set_base(pretrained.load_params(
        pretrained.Pretrained(base["where"], {}, None), trainer.abstract_params,
        task.head_keys, sharding.replicated(mesh), tensors, announce=False))
    del tensors
  source = None  # its tensors (an HF checkpoint keeps them all) are not needed any more
  os.makedirs(workdir, exist_ok=True)
  lock.acquire()  # before anything is removed or written (a new workdir: now it exists)
  if overwrite and jax.process_index() == 0:
    _discard_earlier_run(workdir)
  checkpointer = checkpointer or Checkpointer(workdir, t.keep_checkpoints)
  best_checkpointer = Checkpointer(workdir, 1, folder="best")
  meta = {"config": config.to_dict(), "tokenizer": data.tokenizer.to_dict(),
          "data_fingerprint": data.fingerprint, "base": base,
          "num_labels": task.num_labels, "label_names": list(data.prepared.label_names)}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(meta["config"], f, indent=2)
    if hasattr(data.tokenizer, "model_proto"):  # SentencePiece: usable by other tools too
      with open(os.path.join(workdir, "tokenizer.model"), "wb") as f:
        f.write(data.tokenizer.model_proto)

  writer = metrics.MetricWriter(workdir, resume_step=start_step)
  def example_flops(lengths):
    """Model FLOPs of one training example (row) of these lengths (task.batch_lengths)."""
    return task.example_flops(trainer.abstract_params, trainer.abstract_frozen, lengths)

  flops_at = {}  # lengths -> FLOPs of an example (length buckets vary them)
  flops_per_token = example_flops(task.nominal_lengths(config.data.seq_len)) / config.data.seq_len
  peak, peak_source = metrics.peak_flops_per_device(config.model.dtype, config.log.peak_flops)
  tokens_per_step = t.batch_size * config.data.seq_len
  unit = "tokens" if data.streams else "examples"
  metrics.log(f"lm: data {data.source}: train {data.size('train'):,} / validation "
              f"{data.size('validation'):,} / test {data.size('test'):,} {unit}, "
              f"{data.tokenizer.kind} tokenizer, vocab {trainer.model_cfg.vocab_size}")
  trains = (f" ({trainer.num_trainable:,} trainable, "
            f"{trainer.num_trainable / trainer.num_params:.2%}: peft {config.peft.method})"
            if config.peft.method else "")
  metrics.log(f"lm: {task.objective} model {trainer.num_params:,} parameters{trains}, "
              f"{flops_per_token * tokens_per_step / 1e9:.2f} GFLOP per step; mesh "
              f"{dict(mesh.shape)}; MFU against {peak / 1e9:,.0f} GFLOP/s a device "
              f"({peak_source})")
  if start_step:
    metrics.log(f"lm: resumed from step {start_step}")

  train_batches = data.iterator(train_dataset, state=data_state)
  # A rerun of a run that stopped early does not train on.
  stopped_early = bool(t.early_stopping and best and best["bad_evals"] >= t.early_stopping)
  if stopped_early:
    end_step = start_step
  train_losses = {}
  pending = []  # (step, metrics on device) since the last log line
  interval_tokens = interval_flops = 0  # of the steps since the last log line
  compiled_before = 0.0  # compile seconds already taken out of earlier intervals
  last_log_time, last_log_step = time.perf_counter(), start_step
  paused = 0.0  # seconds spent evaluating since the last log line, not training
  last_checkpoint = start_step
  step = start_step
  last_validation = None  # the whole split's metrics at the last step, if evaluated there
  profiler = Profiler(os.path.join(workdir, "profile"), start_step + 3, t.profile_steps)
  failing = False
  try:
    with stop_signals() as stop_signal:
      while step < end_step:
        first, step = step + 1, _dispatch_end(step, end_step, t, profiler)
        profiler.before(first, state)
        host_batches = [next(train_batches) for _ in range(step - first + 1)]
        for batch, size in _dispatches(trainer, host_batches):
          if size:  # stacked: [size, B, ...]
            state, step_metrics = trainer.train_steps(state, batch)
            pending.append((range(first, first + size), step_metrics))
          else:
            state, step_metrics = trainer.train_step(state, batch)
            pending.append((first, step_metrics))
          size = size or 1
          first += size
          rows, _ = batch.rows_and_length  # seq_len, or a length bucket's
          lengths = task.batch_lengths(batch)
          if lengths not in flops_at:
            flops_at[lengths] = example_flops(lengths)
          interval_tokens += batch.inputs_BxL.size
          interval_flops += size * rows * flops_at[lengths]
        profiler.after(step, state)
        preempted = bool(stop_signal) or (jax.process_count() > 1 and
                                          checkpointer.manager.reached_preemption(step))
        if step % t.log_every == 0 or step == end_step or preempted:
          fetched = _per_step(jax.device_get(pending))
          check_finite(fetched, t.nonfinite, last_checkpoint)
          now = time.perf_counter()
          elapsed = now - last_log_time - paused
          elapsed -= trainer.compile_seconds - compiled_before  # compiled in this interval
          compiled_before = trainer.compile_seconds
          elapsed = max(elapsed, 1e-9)
          steps_done = step - last_log_step
          step_ms = 1000 * elapsed / steps_done
          tokens_per_s = interval_tokens / elapsed  # padding included: it is computed too
          mfu = interval_flops / elapsed / (peak * len(devices))
          for s, m in fetched:
            train_losses[s] = float(m["loss"])
          last = fetched[-1][1]
          writer.write(step, {"train/loss": last["loss"], "train/grad_norm": last["grad_norm"],
                              "train/learning_rate": last["learning_rate"],
                              "train/skipped_steps": last["skipped"],
                              **({"train/loss_scale": last["loss_scale"]}
                                 if "loss_scale" in last else {}),
                              "perf/tokens_per_s": tokens_per_s, "perf/ms_per_step": step_ms,
                              "perf/mfu": mfu})
          skipped = f" | skipped {int(last['skipped'])}" if last["skipped"] else ""
          metrics.log(f"step {step:>6} | loss {float(last['loss']):.4f} | "
                      f"{tokens_per_s:,.0f} tok/s | {step_ms:.1f} ms/step | MFU {mfu:.2%}"
                      f"{skipped}")
          pending, last_log_time, last_log_step, paused = [], time.perf_counter(), step, 0.0
          interval_tokens = interval_flops = 0
        # Task scores, and language-model losses with eval_steps=0, cover the whole
        # validation split: the last step's evaluation is then the final one, and may be
        # the best. Otherwise the final evaluation over the whole split comes after the loop.
        at_end = step == t.num_steps
        full = not task.token_scored or not t.eval_steps
        if (step % t.eval_every == 0 and not at_end or at_end and full) and not preempted:
          jax.block_until_ready(state)  # so the pause excludes queued train steps
          eval_start = time.perf_counter()
          result = evaluation.eval_metrics(trainer, data, config, state.params, "validation",
                                           t.eval_steps)
          if at_end:
            last_validation = result
          writer.write(step, {f"eval/{k}": v for k, v in result.items()
                              if k not in ("tokens", "examples")})
          if task.better(result, best and best["validation"]):
            best = {"step": step, "validation": result, "bad_evals": 0}
            best_checkpointer.save(step, state, {**meta, "best": dict(best)})
            mark = " | best so far"
          else:
            best["bad_evals"] += 1
            mark = f" | no better than step {best['step']}"
          metrics.log(f"step {step:>6} | eval {evaluation.describe(result)}{mark}")
          stopped_early = (bool(t.early_stopping) and best["bad_evals"] >= t.early_stopping
                           and step < t.num_steps)
          if stopped_early:
            metrics.log(f"lm: stopping early: {t.early_stopping} evaluations without a better "
                        f"validation {task.selection[0]} than step {best['step']}")
          paused += time.perf_counter() - eval_start
        if (step % t.checkpoint_every == 0 or step == end_step or preempted or stopped_early):
          check_finite(_per_step(jax.device_get(pending)), t.nonfinite, last_checkpoint)
          # Every process's iterator is at the same batch index, so the primary's state (the
          # one Orbax writes) restores every process.
          checkpointer.save(step, state, {**meta, "data_state": train_batches.get_state(),
                                          "best": best and dict(best)})
          last_checkpoint = step
        if preempted:
          checkpointer.wait()
          raise Preempted(step, stop_signal[0] if stop_signal else "preemption notice")
        if stopped_early:
          break
    checkpointer.wait()
    best_checkpointer.wait()

    final = {}
    finished = step == t.num_steps or stopped_early
    if finished:
      final = evaluation.final_evaluations(trainer, data, config, state, best,
                                           best_checkpointer, writer, step, last_validation)
    sample = ""
    if config.sample.num_tokens and finished and task.ends_with_sample:
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
      best_checkpointer.close()
  return RunResult(workdir=workdir, final_step=step, train_losses=train_losses, eval=final,
                   sample=sample, best=best or {})


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


def _per_step(fetched):
  """[(step, metrics)] from pending entries of one step or of a dispatch's range of steps."""
  out = []
  for steps, m in fetched:
    if isinstance(steps, range):
      out.extend((s, {k: v[i] for k, v in m.items()}) for i, s in enumerate(steps))
    else:
      out.append((steps, m))
  return out
