"""Evaluation during training, the best checkpoint (workdir/best) and early stopping.

    selection = Selection(trainer, data, config, workdir, writer, start.best)
    if selection.due(step, preempted):
      selection.evaluate(step, state, meta)   # logs; saves workdir/best when it is better
    selection.stopped_early                   # train.early_stopping evaluations, no better

The task's selection score (lm/tasks/) says which evaluation is better. Task scores, and
language-model losses with eval_steps=0, cover the whole validation split: the last step's
evaluation is then the final one (`last_validation`), and may be the best. Otherwise the
final evaluation over the whole split comes after the loop (lm/evaluation.py).
"""

from lm import evaluation, metrics
from lm.checkpoint import Checkpointer


class Selection:

  def __init__(self, trainer, data, config, workdir, writer, best=None):
    self.trainer, self.data, self.config, self.writer = trainer, data, config, writer
    self.task, self.t = trainer.task, config.train
    self.best = best  # {"step", "validation", "bad_evals"}, or None before any evaluation
    self.checkpointer = Checkpointer(workdir, 1, folder="best")
    self.last_validation = None  # the whole split's metrics at the last step, if evaluated
    self.harness_step = None  # the step whose parameters the harness tasks last scored

  @property
  def stopped_early(self):
    """train.early_stopping evaluations in a row were no better than the best (which a
    rerun of a run that stopped so does not train on from)."""
    return bool(self.t.early_stopping and self.best
                and self.best["bad_evals"] >= self.t.early_stopping)

  def due(self, step, preempted):
    """Whether the loop evaluates after `step`."""
    at_end = step == self.t.num_steps
    full = not self.task.token_scored or not self.t.eval_steps
    return (step % self.t.eval_every == 0 and not at_end or at_end and full) and not preempted

  def evaluate(self, step, state, meta):
    """Evaluates on validation, logs, and saves workdir/best (with `meta`) if better."""
    t = self.t
    result = evaluation.eval_metrics(self.trainer, self.data, self.config, state.params,
                                     "validation", t.eval_steps)
    if self.config.task.eval_generate:  # scores of generated answers, beside the loss
      generated = evaluation.generation_scores(self.trainer, self.data, self.config,
                                               state.params, step)
      result = {**result, **{f"generate_{k}": v for k, v in generated.items()
                             if k != "count"}}
    if evaluation.harness_due(self.config, step):
      self.harness(step, state)
    if step == t.num_steps:
      self.last_validation = result
    self.writer.write(step, {f"eval/{k}": v for k, v in result.items()
                             if k not in ("tokens", "examples")})
    if self.task.better(result, self.best and self.best["validation"]):
      self.best = {"step": step, "validation": result, "bad_evals": 0}
      self.checkpointer.save(step, state, {**meta, "best": dict(self.best)})
      mark = " | best so far"
    else:
      self.best["bad_evals"] += 1
      mark = f" | no better than step {self.best['step']}"
    metrics.log(f"step {step:>6} | eval {evaluation.describe(result)}{mark}")
    if self.stopped_early and step < t.num_steps:
      metrics.log(f"lm: stopping early: {t.early_stopping} evaluations without a better "
                  f"validation {self.task.selection[0]} than step {self.best['step']}")

  def harness(self, step, state):
    """config.eval.harness_tasks on the parameters of `step`: logged as harness/<task>/..."""
    scores = evaluation.harness_scores(self.trainer, self.data, self.config, state.params,
                                       step)
    self.writer.write(step, {f"harness/{k}": v for k, v in scores.items()})
    metrics.log(f"step {step:>6} | harness " + " | ".join(
        f"{k} {v:.4f}" for k, v in scores.items() if not k.endswith("_stderr")))
    self.harness_step = step

  def final(self, state, step):
    """The final evaluations (lm.evaluation.final_evaluations) by this selection; the
    harness tasks on the last step's parameters, unless its evaluation ran them."""
    if self.config.eval.harness_tasks and self.harness_step != step:
      self.harness(step, state)
    return evaluation.final_evaluations(self.trainer, self.data, self.config, state,
                                        self.best, self.checkpointer, self.writer, step,
                                        self.last_validation)

  def wait(self):
    self.checkpointer.wait()

  def close(self):
    self.checkpointer.close()
