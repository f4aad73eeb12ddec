"""Hyperparameter grid sweeps: every combination, one after another, each in its own workdir.

    python -m lm.sweep --config=experiments/sst2.py \
        --sweep=train.learning_rate=1e-5,3e-5,1e-4 --sweep=train.batch_size=16,32 \
        [--workdir=runs/sst2-sweep] [--config.train.num_steps=500 ...]

Run k of the grid trains in WORKDIR/<field=value,...>; an interrupted sweep rerun with the
same command resumes each run from its checkpoints (finished runs only re-evaluate). At the
end it prints the best validation score of each setting (the objective's selection score,
lm/tasks/), best first, and writes the table to WORKDIR/sweep.jsonl.
"""

import functools
import itertools
import json
import os
import re
import time

from absl import app, flags


def parse_sweeps(config, specs):
  """[(field, [values])] from 'section.field=v1,v2' strings, each value of the field's type."""
  from lm.config import ConfigError  # pylint: disable=import-outside-toplevel
  axes = []
  for spec in specs:
    field, sep, values = spec.partition("=")
    field = field.strip()
    if not sep or not values.strip():
      raise ConfigError(field or spec, f"--sweep={spec!r}: expected field=v1,v2,...")
    parts = field.split(".")
    node = config
    for part in parts[:-1]:
      if part not in node:
        raise ConfigError(field, "unknown field")
      node = node[part]
    if parts[-1] not in node:
      raise ConfigError(field, "unknown field")
    current = node[parts[-1]]
    kind = type(current) if current is not None else str
    parsed = []
    for raw in values.split(","):
      raw = raw.strip()
      try:
        if kind is bool:
          if raw.lower() not in ("true", "false"):
            raise ValueError(raw)
          parsed.append(raw.lower() == "true")
        else:
          parsed.append(kind(raw))
      except ValueError:
        raise ConfigError(field, f"--sweep value {raw!r} is not a {kind.__name__}") from None
    if any(f == field for f, _ in axes):
      raise ConfigError(field, "swept twice")
    axes.append((field, parsed))
  return axes


def grid(axes):
  """Every combination, as [(field, value), ...] lists, in the order --sweep gave them."""
  fields = [f for f, _ in axes]
  return [list(zip(fields, values)) for values in itertools.product(*(v for _, v in axes))]


def run_name(setting):
  return ",".join(f"{f}={v}" for f, v in setting) or "base"


def _set(config, field, value):
  *path, last = field.split(".")
  node = config
  for part in path:
    node = node[part]
  node[last] = value


def sweep(config, axes, root, overwrite=False):
  """Runs the grid; returns (the table rows (dicts), best first; the score's name)."""
  import jax  # pylint: disable=import-outside-toplevel

  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  from lm import loop, tasks  # pylint: disable=import-outside-toplevel
  name, mode = tasks.get(config.task.objective).selection
  rows = []
  settings = grid(axes)
  configs = []
  for setting in settings:  # every setting checked before the first run starts
    run_config = config.copy_and_resolve_references()
    for field, value in setting:
      _set(run_config, field, value)
    try:
      configs.append(config_lib.validate(run_config, len(jax.devices())))
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(e.field, f"{str(e).split(': ', 1)[1]} (in the sweep "
                                   f"setting {run_name(setting)})") from None
  for k, (setting, run_config) in enumerate(zip(settings, configs)):
    workdir = os.path.join(root, re.sub(r"[^\w.,=+-]", "_", run_name(setting)))
    print(f"lm.sweep: run {k + 1}/{len(settings)}: {run_name(setting)} in {workdir}",
          flush=True)
    start = time.perf_counter()
    result = loop.run(run_config, workdir, overwrite=overwrite)
    validation = result.best.get("validation") or result.eval.get("validation") or {}
    rows.append({"setting": dict(setting), "workdir": workdir, "score": validation.get(name),
                 "best_step": result.best.get("step"), "validation": validation,
                 "seconds": round(time.perf_counter() - start, 1)})
  missing = float("inf") if mode == "min" else float("-inf")
  rows.sort(key=lambda r: missing if r["score"] is None else r["score"], reverse=mode == "max")
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "sweep.jsonl"), "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return rows, name


def format_table(rows, score_name, fields):
  header = [*fields, f"validation {score_name}", "best step", "seconds"]
  lines = [header]
  for r in rows:
    score = "-" if r["score"] is None else f"{r['score']:.4f}"
    lines.append([str(r["setting"][f]) for f in fields] +
                 [score, str(r["best_step"] or "-"), f"{r['seconds']:.0f}"])
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def main(lm_main, sweep_flag, argv):
  if len(argv) > 1:
    lm_main.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  from lm.errors import NonFiniteLoss, Preempted, UserError  # pylint: disable=import-outside-toplevel
  config = lm_main.loaded_config()
  root = flags.FLAGS.workdir or lm_main.default_workdir(
      lm_main.config_flags.get_config_filename(flags.FLAGS["config"])) + "-sweep"
  try:
    axes = parse_sweeps(config, sweep_flag.value)
    if not axes:
      lm_main.fail("give at least one --sweep=field=v1,v2,...")
    rows, score_name = sweep(config, axes, root, overwrite=flags.FLAGS.overwrite)
  except UserError as e:
    lm_main.fail(str(e))
  except NonFiniteLoss as e:
    lm_main.fail(str(e), lm_main.EXIT_NONFINITE)
  except Preempted as e:
    lm_main.fail(f"{e}; rerun the same command to resume the sweep",
                 lm_main.EXIT_PREEMPTED)
  print(f"\nlm.sweep: {len(rows)} runs in {root}, best validation {score_name} first:")
  print(format_table(rows, score_name, [f for f, _ in axes]), flush=True)


def _cli():
  # lm.main's flags (--config, --workdir, --overwrite, ...) are defined on import: only here,
  # so that importing this module (tests, notebooks) defines no flags.
  from lm import main as lm_main  # pylint: disable=import-outside-toplevel
  sweep_flag = flags.DEFINE_multi_string(
      "sweep", [], "field=v1,v2,...: values of one config field; several --sweep make a grid.")
  app.run(functools.partial(main, lm_main, sweep_flag), flags_parser=lm_main.parse_flags)


if __name__ == "__main__":
  _cli()
