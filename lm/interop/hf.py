"""Hugging Face checkpoints in and out of lm, verified to the logit (tests/test_interop.py).

    python -m lm.interop.hf import --src=HF_FOLDER|FILE.gguf --dst=LM_WORKDIR
    python -m lm.interop.hf export --src=LM_WORKDIR --dst=HF_FOLDER|FILE.gguf [--step=N]
                                   [--gguf_type=f32|f16|bf16]
    config.init_from = "hf:HF_FOLDER"      # fine-tune a Hugging Face checkpoint directly

A Hugging Face folder holds config.json, the weights (`*.safetensors`, or
`pytorch_model.bin` read by a restricted unpickler that rebuilds tensors and nothing else)
and the tokenizer (tokenizer.json; or vocab.txt, vocab.json + merges.txt, tokenizer.model).
Import writes an lm workdir whose checkpoint 0 holds the weights (parameters only, no
optimizer state), the matching lm config and the tokenizer: lm.sample, lm.serve and lm.chat
run it, export writes it back, and `init_from` fine-tunes from it. Export
writes config.json, model.safetensors and the tokenizer, for `from_pretrained`.
The tensor mappings are in lm/interop/hf_models.py, the folder's files read and written by
lm/interop/hf_folder.py and lm/interop/weights.py.
"""

import argparse
import json
import os
import sys

import jax
from jax.sharding import SingleDeviceSharding

from lm import metrics, pretrained, sharding, tasks, trees
from lm.checkpoint import Checkpointer
from lm.data.tokenizers import from_dict
from lm.errors import UserError
from lm.interop import gguf_file, hf_models
from lm.interop.hf_folder import Converted, write_tokenizer
from lm.interop.weights import write_safetensors
from lm.model_setup import ModelSetup


def import_checkpoint(src, dst):
  """Writes the Hugging Face checkpoint `src` as the lm workdir `dst` (checkpoint 0)."""
  converted = Converted(src)
  if os.path.isdir(os.path.join(dst, "checkpoints")) and os.listdir(
      os.path.join(dst, "checkpoints")):
    raise UserError(f"--dst: {dst} already holds checkpoints; choose an empty folder")
  config = converted.lm_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  setup = ModelSetup(config, converted.tokenizer.vocab_size, mesh)
  source = pretrained.Pretrained(f"{converted.arch} checkpoint {converted.folder}", {},
                                 lambda _: dict(converted.tensors))
  for note in converted.notes:
    metrics.log(f"lm: {converted.folder}: {note}; it keeps lm's initialisation")
  replicated = sharding.replicated(mesh)
  # Every tensor from the checkpoint: nothing to initialise (a 135M model's initialiser is
  # most of an import's time and memory). Otherwise the missing ones keep lm's
  # initialisation, what a fresh run of this config has.
  params = pretrained.load_params(source, setup.abstract_params, setup.task.head_keys,
                                  replicated)
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    initial = jax.device_get(setup.initial_params())
    params = pretrained.load_params(source, initial, setup.task.head_keys, replicated,
                                    announce=False)
  # The parameters only (no Adam state, which would triple the checkpoint): lm.sample,
  # lm.serve, lm.chat and export read them, and init_from fine-tunes from them.
  state = {"params": setup.place(params, setup.param_shardings)}
  os.makedirs(dst, exist_ok=True)
  checkpointer = Checkpointer(dst, 1)
  meta = {"config": config.to_dict(), "tokenizer": converted.tokenizer.to_dict(),
          "data_fingerprint": f"hf:{converted.folder}", "imported_from": converted.folder,
          "params_only": True}
  checkpointer.save(0, state, meta)
  checkpointer.close()
  with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
    json.dump(meta["config"], f, indent=2)
  metrics.log(f"lm: imported {converted.arch} ({setup.num_params:,} parameters) from "
              f"{converted.folder} into {os.path.abspath(dst)}/checkpoints/0")
  return config


def export_checkpoint(src, dst, step=None, best=False, gguf_type="f32"):
  """Writes the lm workdir `src`'s checkpoint (newest, `step`, or the best) as a Hugging Face
  folder `dst`: config.json, model.safetensors and the tokenizer's files; or, for a `dst`
  ending in .gguf, as one GGUF file (gguf_file.WRITES' decoders, matrices in `gguf_type`)."""
  source = pretrained.from_workdir(os.path.abspath(src),
                                   ("best",) if best else ("checkpoints",), step)
  config = source.meta["config"]
  fields = config["model"]
  objective = config.get("task", {}).get("objective", "causal")
  if config["model"].get("scan_layers"):
    fields = {**fields, "scan_layers": False}
  arch = hf_models.exportable_as(fields, tasks.get(objective).architecture)
  flat = trees.unstack_layers(source.read(SingleDeviceSharding(jax.devices()[0])))
  dropped = sorted({n.split("/")[0] for n in flat if n.endswith("_head") or
                    n.startswith(("classification_head", "tagging_head"))})
  tensors = hf_models.to_hf(arch, fields, flat)
  tokenizer = from_dict(source.meta["tokenizer"])
  if dst.endswith(".gguf"):
    if arch not in gguf_file.WRITES:
      raise UserError(f"GGUF export writes {', '.join(gguf_file.WRITES)} models; this one "
                      f"is {arch}-like: export it to a Hugging Face folder instead")
    config = hf_models.hf_config(arch, fields, tokenizer)
    gguf_file.write(dst, config, tensors, tokenizer, gguf_type)
    metrics.log(f"lm: exported {source.where} as a {gguf_type} GGUF file "
                f"{os.path.abspath(dst)}")
    return
  os.makedirs(dst, exist_ok=True)
  write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
  with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_models.hf_config(arch, fields, tokenizer, "mlm_head/bias" in flat), f,
              indent=2)
  write_tokenizer(dst, tokenizer, arch)
  kept = [n for n in dropped if n != "mlm_head"]
  metrics.log(f"lm: exported {source.where} as {arch} to {os.path.abspath(dst)}"
              + (f" (without {', '.join(kept)}: transformers' {arch} has no such head)"
                 if kept else ""))


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m lm.interop.hf",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("command", choices=("import", "export"))
  parser.add_argument("--src", required=True, help="import: a Hugging Face folder or a "
                      ".gguf file; export: an lm workdir")
  parser.add_argument("--dst", required=True, help="import: an lm workdir to create; "
                      "export: a folder for from_pretrained")
  parser.add_argument("--step", type=int, default=None, help="export: this checkpoint")
  parser.add_argument("--best", action="store_true", help="export: the best checkpoint")
  parser.add_argument("--gguf_type", default="f32", choices=gguf_file.EXPORT_TYPES,
                      help="export to a .gguf file: the matrices' type")
  args = parser.parse_args(argv)
  try:
    if args.command == "import":
      import_checkpoint(args.src, args.dst)
    else:
      export_checkpoint(args.src, args.dst, args.step, args.best, args.gguf_type)
  except UserError as e:
    print(f"lm: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
