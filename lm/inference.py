"""A trained model, ready to decode: loaded from a workdir's checkpoint.

`load(workdir)` reads the newest complete checkpoint (or `step`), rebuilds the model from the
config stored with it, restores the parameters onto one device (or a mesh), and restores the
exact tokenizer the run trained with. `Generator` wraps lm/decode.py for text in, text out.
"""

import dataclasses
import os
import sys

import jax
import ml_collections

from lm import chat_template, decode, pretrained, sharding, tasks
from lm.checkpoint import Checkpointer
from lm.model_setup import ModelSetup
from lm.data.tokenizers import from_dict
from lm.errors import UserError


@dataclasses.dataclass
class Loaded:
  model: object
  params: dict
  tokenizer: object
  config: ml_collections.ConfigDict
  step: int
  mesh: object
  label_names: tuple = ()  # classification and tagging: the class names, by id
  workdir: str = ""

  def on_mesh(self):
    """Activates the mesh and logical axis rules, so the KV cache is sharded by them."""
    return sharding.on_mesh(self.mesh)

  def encode_prompt(self, text):
    """Token ids of a prompt as the model's tokenizer gives them (tokenizers.prompt_ids:
    after bos for lm's own tokenizers, whose training documents start with it; a
    checkpoint's tokenizer adds bos only if it does so itself)."""
    return self.tokenizer.prompt_ids(text)

  def chat_ids(self, messages, add_generation_prompt=True):
    """A conversation's token ids, rendered with the checkpoint's chat template (an lm-trained
    model's: ChatML) as transformers' apply_chat_template renders and tokenizes it."""
    text = chat_template.render(self.tokenizer.chat_template, messages, add_generation_prompt,
                                self.tokenizer.special_tokens(),
                                source=f"the chat template of {self.workdir or 'the model'}")
    return self.tokenizer.chat_ids(text)

  @property
  def stop_ids(self):
    """A new document (`bos`) or `eos` ends a completion."""
    return (self.tokenizer.bos_id, self.tokenizer.eos_id)

  def complete(self, prompts, max_tokens, sampling):
    """Texts continuing each prompt text (decoding is cut at a stop token)."""
    with self.on_mesh():
      ids = decode.generate(self.model, self.params, [self.encode_prompt(p) for p in prompts],
                            max_tokens, sampling, self.stop_ids)
    return [self.tokenizer.decode(x) for x in ids]


def load(workdir, step=None, devices=None, decoder=True):
  """The model of `workdir`'s newest complete checkpoint (or checkpoint `step`).
  `decoder`: refuse other models (an encoder, which lm.sample and lm.serve cannot decode)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"--workdir: {workdir} holds no checkpoints (train with lm.main first)")
  checkpointer = Checkpointer(workdir, keep=None)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise UserError(f"--workdir: {workdir} holds no complete checkpoint")
    if step is not None and step not in steps:
      raise UserError(f"--step: no checkpoint {step} in {workdir} (there are "
                      f"{', '.join(map(str, sorted(steps)))})")
    step = steps[0] if step is None else step
    meta = checkpointer.read_meta(step)
    config = ml_collections.ConfigDict(meta["config"])
    objective = config.get("task", {}).get("objective", "causal")
    if decoder and tasks.get(objective).architecture != "decoder":
      raise UserError(f"--workdir: {workdir} holds a {objective} model (an encoder); "
                      "sampling and serving decode causal language models")
    tokenizer = from_dict(meta["tokenizer"])
    devices = list(devices or jax.devices()[:1])
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = len(devices), 1, 1
    # Kernels are this machine's, whatever the training run's were (a TPU run's splash).
    config.model.kernels = "auto"
    mesh = sharding.make_mesh(config.mesh, devices)
    num_labels = _num_labels(checkpointer, step, meta)
    if config.get("peft", {}).get("method"):
      # The checkpoint holds adapters (or biases) and a pointer to the base: serve the plain
      # model with them merged in (lm/peft.py), at no extra cost per token.
      params, setup = _load_peft(workdir, step, config, tokenizer, mesh, num_labels)
    else:
      setup = ModelSetup(config, tokenizer.vocab_size, mesh, num_labels)
      checkpointer.check_param_shapes(step, setup.abstract_params)
      params = checkpointer.restore_params(
          step, sharding.abstract_like(setup.abstract_params, setup.param_shardings))
  finally:
    checkpointer.close()
  return Loaded(model=setup.model, params=params, tokenizer=tokenizer, config=config,
                step=step, mesh=mesh, label_names=tuple(meta.get("label_names", ())),
                workdir=workdir)


def _num_labels(checkpointer, step, meta):
  """The task head's outputs: recorded in the checkpoint's metadata, or (checkpoints written
  before it was) read from the saved head's shape."""
  if "num_labels" in meta:
    return meta["num_labels"]
  for name, leaf in checkpointer.saved_params(step).items():
    if name in ("classification_head/out/bias", "tagging_head/out/bias"):
      return int(leaf.shape[0])
  return 0


def _load_peft(workdir, step, config, tokenizer, mesh, num_labels):
  plain = ml_collections.ConfigDict(config.to_dict())
  plain.peft.method = ""
  setup = ModelSetup(plain, tokenizer.vocab_size, mesh, num_labels)
  merged = pretrained.from_workdir(os.path.abspath(workdir), ("checkpoints",), step)
  params = pretrained.load_params(merged, setup.abstract_params, setup.task.head_keys,
                                  sharding.replicated(mesh), announce=False)
  return setup.place(params, setup.param_shardings), setup


def load_or_exit(argv, workdir, step=None):
  """The command lines' common start (lm.sample, lm.serve): load `workdir`, or print one
  `lm: error:` line and exit with status 2."""
  def fail(message):
    print(f"lm: error: {message}", file=sys.stderr)
    sys.exit(2)

  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not workdir:
    fail("--workdir is required")
  try:
    return load(workdir, step)
  except UserError as e:
    fail(str(e))
