"""The training loop: data -> train steps -> eval -> checkpoints -> a sample.

`run(config, workdir)` is what `python -m lm.main` calls. Re-running it on the same workdir
resumes from the latest complete checkpoint and continues with the losses an uninterrupted
run has. SIGTERM/SIGINT save a checkpoint at the current step and raise Preempted; a NaN/Inf
step raises NonFiniteLoss (or is skipped, by config) without touching the checkpoints.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import threading
import time

import jax
import numpy as np

from lm import config as config_lib
from lm import decode, metrics, sharding
from lm.checkpoint import Checkpointer, abstract_like, config_differences
from lm.data import make_data
from lm.errors import NonFiniteLoss, Preempted, UserError
from lm.train import Trainer

WORKDIR_FILES = ("checkpoints", "corrupt_checkpoints", "metrics.jsonl", "tensorboard",
                 "config.json", "profile", "tokenizer.model")


@dataclasses.dataclass
class RunResult:
  workdir: str
  final_step: int
  train_losses: dict  # step -> loss, for the steps that were logged
  eval: dict  # split -> {"loss", "perplexity", "tokens"} from the final evaluation
  sample: str


def _eval_metrics(trainer, data, config, params, split, max_batches):
  batches = data.eval_batches(split, config.train.batch_size, config.data.seq_len,
                              jax.process_index(), jax.process_count())
  if max_batches:
    batches = batches[:max_batches]
  loss, tokens = trainer.evaluate(params, data.iterator(batches))
  result = {"loss": loss, "perplexity": float(np.exp(min(loss, 80.0))), "tokens": tokens}
  if not max_batches and data.format == "text" and data.streams[split].characters:
    # Every target's loss, document ends included, per character of the split's text: a
    # figure that compares models with different vocabularies.
    result["nats_per_char"] = loss * tokens / data.streams[split].characters
  return result


def _latest_meta(checkpointer, config):
  """(step, meta) of the newest readable checkpoint, checked to belong to this config."""
  for step in checkpointer.all_steps():
    try:
      meta = checkpointer.read_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      metrics.log(f"lm: warning: {checkpointer.quarantine(step, e)}")
      continue
    changed = config_differences(meta["config"], config.to_dict())
    if changed:
      raise UserError(f"workdir {checkpointer.workdir} holds a checkpoint of a different "
                      f"config ({'; '.join(changed)}); use another --workdir, or --overwrite "
                      "to discard it")
    return step, meta
  return None, None


def _restore(checkpointer, trainer, newest):
  """The newest checkpoint at or before `newest` that restores completely."""
  abstract = abstract_like(trainer.abstract_state, trainer.state_shardings)
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


@contextlib.contextmanager
def _stop_signals():
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


class _Profiler:
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


def _check_finite(fetched, policy, last_checkpoint):
  for step, m in fetched:
    if m["nonfinite"] and policy == "stop":
      where = (f"checkpoint {last_checkpoint} is the last good one" if last_checkpoint
               else "no checkpoint was written")
      raise NonFiniteLoss(
          f"step {step}: loss {float(m['loss'])}, gradient norm {float(m['grad_norm'])}: "
          f"not finite; stopped without applying it ({where}). Lower train.learning_rate, "
          "check the data, or set train.nonfinite=skip")


def run(config, workdir, devices=None, stop_after=None, overwrite=False):
  """Trains, evaluates, checkpoints and samples. `stop_after` ends early (as a preemption).

  `overwrite` discards what an earlier run left in `workdir` instead of resuming from it.
  """
  devices = list(jax.devices() if devices is None else devices)
  config_lib.validate(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  t = config.train
  metrics.log(f"lm: workdir {os.path.abspath(workdir)}")
  # Nothing is written to (or, with --overwrite, removed from) the workdir until the config,
  # the data and any checkpoint there have been checked.
  checkpointer = start_step = meta = None
  if not overwrite and os.path.isdir(os.path.join(workdir, "checkpoints")):
    checkpointer = Checkpointer(workdir, t.keep_checkpoints)
    start_step, meta = _latest_meta(checkpointer, config)

  data = make_data(config, tokenizer_spec=meta and meta["tokenizer"])
  if data.format != "text":
    raise UserError(f"config.data.format: lm.main trains causal language models on text; "
                    f"{data.source} is a {data.format} dataset")
  if data.size("validation") < 2:
    raise UserError(f"config.data.validation_fraction: no text of {data.source} landed in the "
                    "validation split (folders are split by whole documents); raise the "
                    "fraction or add documents")
  if meta and meta["data_fingerprint"] != data.fingerprint:
    raise UserError(f"config.data: the corpus at {data.source} changed since the checkpoint "
                    "in this workdir was written; resuming would train on other data")
  if config.model.vocab_size is not None and config.model.vocab_size < data.tokenizer.vocab_size:
    raise UserError(f"config.model.vocab_size: {config.model.vocab_size} is smaller than the "
                    f"tokenizer's vocabulary ({data.tokenizer.vocab_size})")
  trainer = Trainer(config, data.tokenizer.vocab_size, mesh)
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
  if overwrite and jax.process_index() == 0:
    _discard_earlier_run(workdir)
  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpointer or Checkpointer(workdir, t.keep_checkpoints)
  meta = {"config": config.to_dict(), "tokenizer": data.tokenizer.to_dict(),
          "data_fingerprint": data.fingerprint}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(meta["config"], f, indent=2)
    if hasattr(data.tokenizer, "model_proto"):  # SentencePiece: usable by other tools too
      with open(os.path.join(workdir, "tokenizer.model"), "wb") as f:
        f.write(data.tokenizer.model_proto)
  if state is None:
    state, start_step = trainer.init_state(), 0

  writer = metrics.MetricWriter(workdir, resume_step=start_step)
  flops_per_token = metrics.decoder_train_flops_per_token(
      trainer.abstract_state.params, trainer.model_cfg, config.data.seq_len)
  peak, peak_source = metrics.peak_flops_per_device(config.model.dtype, config.log.peak_flops)
  tokens_per_step = t.batch_size * config.data.seq_len
  metrics.log(f"lm: data {data.source}: train {data.size('train'):,} / validation "
              f"{data.size('validation'):,} / test {data.size('test'):,} tokens, "
              f"{data.tokenizer.kind} tokenizer, vocab {trainer.model_cfg.vocab_size}")
  metrics.log(f"lm: model {trainer.num_params:,} parameters, "
              f"{flops_per_token * tokens_per_step / 1e9:.2f} GFLOP per step; mesh "
              f"{dict(mesh.shape)}; MFU against {peak / 1e9:,.0f} GFLOP/s a device "
              f"({peak_source})")
  if start_step:
    metrics.log(f"lm: resumed from step {start_step}")

  train_batches = data.iterator(
      data.train_batches(t.batch_size, config.data.seq_len, t.seed, jax.process_index(),
                         jax.process_count()), state=data_state)
  end_step = t.num_steps if stop_after is None else min(t.num_steps, stop_after)
  train_losses = {}
  pending = []  # (step, metrics on device) since the last log line
  last_log_time, last_log_step = time.perf_counter(), start_step
  paused = 0.0  # seconds spent evaluating since the last log line, not training
  last_checkpoint = start_step
  step = start_step
  profiler = _Profiler(os.path.join(workdir, "profile"), start_step + 3, t.profile_steps)
  try:
    with _stop_signals() as stop_signal:
      for step in range(start_step + 1, end_step + 1):
        profiler.before(step, state)
        batch = trainer.shard_batch(next(train_batches))
        state, step_metrics = trainer.train_step(state, batch)
        pending.append((step, step_metrics))
        profiler.after(step, state)
        preempted = bool(stop_signal) or (jax.process_count() > 1 and
                                          checkpointer.manager.reached_preemption(step))
        if step % t.log_every == 0 or step == end_step or preempted:
          fetched = jax.device_get(pending)
          _check_finite(fetched, t.nonfinite, last_checkpoint)
          now = time.perf_counter()
          elapsed = now - last_log_time - paused
          if last_log_step == start_step:  # the first interval includes compilation
            elapsed -= trainer.compile_seconds
          elapsed = max(elapsed, 1e-9)
          steps_done = step - last_log_step
          step_ms = 1000 * elapsed / steps_done
          tokens_per_s = tokens_per_step * steps_done / elapsed
          mfu = flops_per_token * tokens_per_s / (peak * len(devices))
          for s, m in fetched:
            train_losses[s] = float(m["loss"])
          last = fetched[-1][1]
          writer.write(step, {"train/loss": last["loss"], "train/grad_norm": last["grad_norm"],
                              "train/learning_rate": last["learning_rate"],
                              "train/skipped_steps": last["skipped"],
                              "perf/tokens_per_s": tokens_per_s, "perf/ms_per_step": step_ms,
                              "perf/mfu": mfu})
          skipped = f" | skipped {int(last['skipped'])}" if last["skipped"] else ""
          metrics.log(f"step {step:>6} | loss {float(last['loss']):.4f} | "
                      f"{tokens_per_s:,.0f} tok/s | {step_ms:.1f} ms/step | MFU {mfu:.2%}"
                      f"{skipped}")
          pending, last_log_time, last_log_step, paused = [], time.perf_counter(), step, 0.0
        if step % t.eval_every == 0 and step != t.num_steps and not preempted:
          jax.block_until_ready(state)  # so the pause excludes queued train steps
          eval_start = time.perf_counter()
          result = _eval_metrics(trainer, data, config, state.params, "validation", t.eval_steps)
          writer.write(step, {"eval/loss": result["loss"], "eval/perplexity": result["perplexity"]})
          metrics.log(f"step {step:>6} | eval loss {result['loss']:.4f} | "
                      f"perplexity {result['perplexity']:.2f}")
          paused += time.perf_counter() - eval_start
        if step % t.checkpoint_every == 0 or step == end_step or preempted:
          _check_finite(jax.device_get(pending), t.nonfinite, last_checkpoint)
          # Every process's iterator is at the same batch index, so the primary's state (the
          # one Orbax writes) restores every process.
          checkpointer.save(step, state, {**meta, "data_state": train_batches.get_state()})
          last_checkpoint = step
        if preempted:
          checkpointer.wait()
          raise Preempted(step, stop_signal[0] if stop_signal else "preemption notice")
    checkpointer.wait()

    final = {}
    if step == t.num_steps:
      for split in ("validation", "test"):
        if data.size(split) > 1:
          final[split] = _eval_metrics(trainer, data, config, state.params, split, 0)
          prefix = "eval" if split == "validation" else "test"
          writer.write(step, {f"{prefix}/{k}": v for k, v in final[split].items()
                              if k != "tokens"})
          per_char = (f" | {final[split]['nats_per_char']:.4f} nats per character"
                      if "nats_per_char" in final[split] else "")
          metrics.log(f"final {split}: loss {final[split]['loss']:.4f} | perplexity "
                      f"{final[split]['perplexity']:.2f} over all "
                      f"{int(final[split]['tokens']):,} tokens{per_char}")
    sample = ""
    if config.sample.num_tokens and step == t.num_steps:
      prompt = config.sample.prompt
      prompt_ids = [data.tokenizer.bos_id, *data.tokenizer.encode(prompt).tolist()]
      params = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))(state.params)
      ids = decode.generate(trainer.model, jax.device_get(params), [prompt_ids],
                            config.sample.num_tokens,
                            decode.Sampling(temperature=config.sample.temperature,
                                            top_k=config.sample.top_k, seed=t.seed))
      sample = prompt + data.tokenizer.decode(ids[0])
      writer.write_text(step, "sample", sample)
      metrics.log(f"sample (temperature {config.sample.temperature}, top-k "
                  f"{config.sample.top_k}):\n{sample}")
  finally:
    profiler.close()
    writer.close()
    with contextlib.suppress(Exception):  # an earlier error says more
      checkpointer.close()
  return RunResult(workdir=workdir, final_step=step, train_losses=train_losses, eval=final,
                   sample=sample)
