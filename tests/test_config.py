"""Config validation: every mistake names its field; the shipped experiments are valid."""

import os
import subprocess
import sys

import ml_collections
import pytest

from conftest import REPO, tiny_config, user_env
from lm import config as lm_config
from lm.config import ConfigError, defaults, resolve_mesh_shape, validate


def load_experiment(name):
  return lm_config.load_experiment(os.path.join(REPO, "experiments", f"{name}.py"))


@pytest.mark.parametrize("name", ["base", "shakespeare_char", "smollm_sft_squad",
                                  "smollm_sft_gsm", "smollm_dpo_pairs", "smollm_dpo_sentiment",
                                  "minilm_movie_sentences"])
def test_experiments_are_valid(name):
  validate(load_experiment(name), num_devices=1)


def test_shakespeare_char_matches_the_nanogpt_reference():
  c = load_experiment("shakespeare_char")
  assert (c.model.num_layers, c.model.num_heads, c.model.d_model, c.data.seq_len,
          c.train.batch_size, c.train.num_steps) == (4, 4, 128, 64, 12, 2000)
  # The one documented change: twice nanoGPT's learning rates (1e-3 to 1e-4).
  assert (c.train.learning_rate, c.train.min_learning_rate, c.train.warmup_steps) == (
      2e-3, 2e-4, 100)
  assert (c.train.b1, c.train.b2, c.train.weight_decay, c.train.grad_clip) == (
      0.9, 0.99, 0.1, 1.0)
  assert (c.model.dropout, c.model.positions, c.model.norm, c.model.mlp,
          c.model.tie_embeddings) == (0.0, "learned", "layernorm", "gelu", True)
  assert c.data.validation_fraction == 0.1 and c.data.test_fraction == 0.0


@pytest.mark.parametrize("field,value,named", [
    ("model.d_model", 30, "model.d_model"),  # not divisible by 4 heads
    ("model.num_kv_heads", 3, "model.num_kv_heads"),  # does not divide 4 heads
    ("data.seq_len", 64, "data.seq_len"),  # > max_len 32
    ("model.dtype", "float8", "model.dtype"),
    ("model.num_layers", 0, "model.num_layers"),
    ("model.num_layers", "4", "model.num_layers"),  # wrong type
    ("model.dropout", 1.0, "model.dropout"),
    ("train.batch_size", 7, "train.batch_size"),  # checked against the mesh below
    ("train.learning_rate", -1.0, "train.learning_rate"),
    ("train.warmup_steps", 100, "train.warmup_steps"),  # > num_steps 6
    ("data.test_fraction", 0.95, "data.test_fraction"),
    ("data.tokenizer", "wordpiece", "data.tokenizer"),
    ("sample.prompt", "", "sample.prompt"),
])
def test_bad_values_name_the_field(field, value, named):
  num_devices = 2 if field == "train.batch_size" else 1
  c = tiny_config()
  if field == "train.batch_size":
    c.mesh.data = 2
  section, key = field.split(".")
  as_dict = c.to_dict()
  as_dict[section][key] = value  # through a dict, so ConfigDict's own type lock is bypassed
  c = ml_collections.ConfigDict(as_dict)
  with pytest.raises(ConfigError) as info:
    validate(c, num_devices)
  assert info.value.field == named
  assert str(info.value).startswith(f"config.{named}:")
  assert "\n" not in str(info.value)


def test_unknown_field_is_named_with_a_suggestion():
  c = tiny_config()
  c.model.num_layer = 3  # ConfigDict lets experiment files add fields; validate does not
  with pytest.raises(ConfigError, match=r"config.model.num_layer: unknown field; did you "
                     r"mean model.num_layers\?"):
    validate(c, 1)


def test_mesh_must_match_device_count():
  c = tiny_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 1
  with pytest.raises(ConfigError, match=r"config.mesh: data\*fsdp\*tensor = 4 but there are 8"):
    validate(c, 8)
  c.mesh.data = -1  # fills in the devices the other axes leave
  assert resolve_mesh_shape(c.mesh, 8) == (4, 2, 1)
  c.mesh.fsdp = 4
  with pytest.raises(ConfigError, match="config.mesh.data: -1 cannot fill the mesh: 6 devices"):
    resolve_mesh_shape(c.mesh, 6)


def test_defaults_have_a_type_for_every_field():
  validate(defaults(), num_devices=1)


def run_cli(*args):
  """`python -m lm.main ...` as a user runs it: one CPU device, not the tests' eight."""
  return subprocess.run([sys.executable, "-m", "lm.main", *args], cwd=REPO, env=user_env(),
                        capture_output=True, text=True, timeout=300)


def test_cli_reports_config_errors_in_one_line(tmp_path):
  workdir = str(tmp_path / "run")
  for args, expected in [
      (["--config.model.num_layer=3"], 'unknown config field \'num_layer\' Did you mean "num_layers"'),
      (["--config.model.num_layers=abc"], "--config.model.num_layers=abc"),
      (["--config.model.d_model=130"], "config.model.d_model: 130 is not divisible"),
      (["--config.mesh.data=2"], "config.mesh: data*fsdp*tensor = 2 but there is 1 device"),
  ]:
    result = run_cli("--config=experiments/base.py", f"--workdir={workdir}", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lm: error: "), result.stderr
    assert expected in lines[0]
  assert not os.path.exists(workdir)  # a failed start writes nothing


def test_every_bounded_or_chosen_schema_field_refuses_a_bad_value_by_name():
  """Each field lm/schema.py bounds or restricts is checked by validate(), by its name: the
  schema is the one place the checks come from."""
  from lm import schema  # pylint: disable=import-outside-toplevel
  bad = {schema.POSITIVE: 0, schema.NON_NEGATIVE: -1, schema.UNIT: 1.0}
  checked = 0
  for field in schema.FIELDS:
    if field.bound is None and field.choices is None:
      continue
    value = bad[field.bound] if field.bound else "no such choice"
    if field.bound and field.value_type is float:
      value = float(value)
    section, key = field.name.split(".")
    as_dict = tiny_config().to_dict()
    as_dict[section][key] = value
    with pytest.raises(ConfigError) as info:
      validate(ml_collections.ConfigDict(as_dict), 1)
    assert info.value.field == field.name, (field.name, str(info.value))
    checked += 1
  assert checked > 40


def test_model_config_is_the_schema_s_model_view():
  """ModelConfig's fields and defaults are the schema's model fields (vocab_size apart),
  and ModelConfig.from_config(defaults()) builds the default model. The one difference:
  kernels, "auto" in a config, is chosen for the platform (the CPU kernels here), and a
  ModelConfig made directly defaults to the portable ones."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from lm.models import ModelConfig  # pylint: disable=import-outside-toplevel
  c = defaults()
  view = ModelConfig.from_config(c.model, 100, "cpu")
  for field in dataclasses.fields(ModelConfig):
    if field.name not in ("vocab_size", "kernels"):
      assert getattr(view, field.name) == c.model[field.name], field.name
      assert field.default == c.model[field.name], field.name
  assert (c.model.kernels, view.kernels, ModelConfig(vocab_size=1).kernels) == (
      "auto", "cpu", "xla")
  assert view.vocab_size == 100 + c.model.extra_tokens
  assert {f.name for f in dataclasses.fields(ModelConfig)} == (
      set(c.model.keys()) - {"extra_tokens"})


def test_experiments_state_only_what_differs():
  """No assignment in an experiment's get_config() sets a field to the value it already has
  (the default, or the value of the experiment it extends): run the function's statements
  one by one and compare each assigned field before and after."""
  import ast  # pylint: disable=import-outside-toplevel
  import glob  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  restated = []
  for path in sorted(glob.glob(os.path.join(REPO, "experiments", "*.py"))):
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    body = next(n for n in tree.body if getattr(n, "name", "") == "get_config").body
    namespace = dict(vars(module))
    for statement in body:
      if isinstance(statement, ast.Return):
        break
      if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Attribute):
        target = ast.unparse(statement.targets[0])
        before = eval(target, namespace)  # pylint: disable=eval-used
        value = eval(ast.unparse(statement.value), namespace)  # pylint: disable=eval-used
        if before == value and type(before) is type(value):
          restated.append(f"{os.path.basename(path)}:{statement.lineno}: {target}")
      exec(compile(ast.Module([statement], []), path, "exec"), namespace)  # pylint: disable=exec-used
  assert not restated, restated
