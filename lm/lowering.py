"""A config's programs lowered for a platform that need not be here: jax.export of the
train step and the decode step for TPU or GPU (CUDA) on a mesh of abstract devices, with
the kernels the model would run there.

    report = lowering.lower(config, "tpu", vocab_size=32000, num_devices=8)

The report says which kernels were chosen, which custom calls the programs contain (the
splash kernel's on TPU, cuDNN's or Triton's on GPU), whether the CPU kernels' barrier copies
crept in (they must not), and XLA's FLOP and byte estimates of the lowered programs where
XLA gives them for that platform (the memory a program needs is known only once it is
compiled there). `python -m lm.plan --lower` prints it for any config.
"""

import copy
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from lm import decode, sharding
from lm.models import ModelConfig, kernels
from lm.models.kernels.cpu import COPY_SCOPE
from lm.tasks.base import host_key
from lm.train import Trainer

EXPORT_PLATFORMS = {"tpu": "tpu", "gpu": "cuda", "cuda": "cuda", "cpu": "cpu"}
DEVICE_PLATFORMS = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "cpu": "cpu"}
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w$.\-]+)")


def custom_calls(mlir_text):
  """{custom-call target: count} of a lowered module's text."""
  found = {}
  for name in _CUSTOM_CALL.findall(mlir_text):
    found[name] = found.get(name, 0) + 1
  return found


def cpu_barrier_copies(mlir_text):
  """How many of the CPU kernels' barrier copies (lm/models/kernels/cpu.py) a lowered
  module holds: barriers under their name scope (remat's own barriers do not count)."""
  return sum(1 for line in mlir_text.splitlines()
             if COPY_SCOPE in line and "optimization_barrier" in line)


def _export(jitted, platform, *args):
  """jax.export of `jitted` for `platform`, allowing every custom call: Pallas and cuDNN
  kernels carry no cross-version compatibility guarantee, which is export's concern for
  serialising, not ours for proving that a program lowers."""
  checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in
            ("tpu_custom_call", "__gpu$xla.gpu.triton", "__cudnn$fmhaSoftmax",
             "__cudnn$fmhaSoftmaxBackward", "__cudnn$fmhaScaleBiasSoftmax",
             "__cudnn$fmhaScaleBiasSoftmaxBackward")]
  return jax.export.export(jitted, platforms=[platform], disabled_checks=checks)(*args)


def _summary(exported, lowered_cost, ops):
  text = exported.mlir_module()
  calls = custom_calls(text)
  expected = [c for c in ops.custom_calls if any(name.startswith(c) for name in calls)]
  out = {"custom_calls": calls, "kernel_calls_found": expected,
         "cpu_barrier_copies": cpu_barrier_copies(text), "mlir_bytes": len(text)}
  if lowered_cost:
    out.update({f"xla_{k.replace(' ', '_')}": lowered_cost[k]
                for k in ("flops", "bytes accessed") if k in lowered_cost})
  return out


# What XLA's estimates are: HLO cost analysis of the lowered, uncompiled program.
COST_NOTE = ("xla_flops and xla_bytes_accessed: XLA's HLO cost analysis before compiling, "
             "which counts a loop body (scanned layers, the decode loop) once and a custom "
             "call (the attention kernel) not at all; lm.plan's FLOPs are the model's")


def _cost(jitted, platform, *args):
  """XLA's cost analysis of the program lowered for `platform` (None if XLA gives none)."""
  try:
    cost = jitted.trace(*args).lower(lowering_platforms=(platform,)).cost_analysis()
  except Exception:  # pylint: disable=broad-except  (a platform XLA cannot analyse here)
    return None
  cost = cost[0] if isinstance(cost, list) else cost
  return {k: float(v) for k, v in (cost or {}).items() if k in ("flops", "bytes accessed")}


def abstract_host_batch(task, rows, seq_len, source_len=None, packed=True):
  """A host batch of the task's Batch type as ShapeDtypeStructs. `packed`: with the
  optional fields too (segment ids and positions: several documents per row, as a packed
  corpus gives them), so that the kernels' segment paths are the ones lowered."""
  sizes = {"B": rows, "L": seq_len, "S": source_len or seq_len}
  batch = {}
  for field in dataclasses.fields(task.Batch):
    optional = field.default is None
    if (optional and not packed) or (field.name == "type_ids_BxL"
                                     and not task.model_cfg.type_vocab_size):
      continue
    shape = tuple(sizes[a] for a in field.name.rsplit("_", 1)[1].split("x"))
    floats = "weight" in field.name or (field.name == "label_B" and task.num_labels == 1)
    batch[host_key(field.name)] = jax.ShapeDtypeStruct(
        shape, jnp.float32 if floats else jnp.int32)
  return batch


def lower(config, platform, vocab_size, num_devices=None, packed=True, decode_batch=8,
          decode_len=256, devices=None):
  """The report (a dict) of the config's train step and, for a decoder, its decode step
  (`decode_batch` rows over `decode_len` cache slots), exported for `platform` ("tpu",
  "gpu"/"cuda", "cpu") on an abstract mesh of `num_devices` devices (default: config.mesh's
  product, at least 1). `packed`: batches with segment ids (abstract_host_batch).
  `devices`: real devices (of any platform) to stand in for the abstract ones: cuDNN's
  attention partitions itself only on a mesh of devices that exist."""
  export_platform, device_platform = EXPORT_PLATFORMS[platform], DEVICE_PLATFORMS[platform]
  note = None
  chosen = ModelConfig.from_config(config.model, vocab_size, device_platform).kernels
  if chosen == "cudnn" and not devices:
    # cuDNN's attention partitions itself through a Python callback at compile time, which
    # an abstract mesh cannot run and an exported program cannot hold: one real device
    # (this machine's) stands in for the GPU, and the program is lowered unsharded.
    config = copy.deepcopy(config)
    config.mesh.data = config.mesh.fsdp = config.mesh.tensor = 1
    num_devices, devices = 1, jax.local_devices()[:1]
    note = ("cudnn lowers on one device only here: its custom partitioning needs devices "
            "at compile time")
  mesh_config = config.mesh
  if num_devices is None:
    num_devices = max(1, int(np.prod([max(mesh_config[a], 1) for a in sharding.MESH_AXES])))
  mesh = (sharding.make_mesh(mesh_config, devices[:num_devices]) if devices
          else sharding.abstract_mesh(mesh_config, num_devices))
  trainer = Trainer(config, vocab_size, mesh, max(config.task.num_labels, 0),
                    platform=device_platform)
  ops = kernels.get(trainer.model_cfg.kernels)
  report = {"platform": export_platform, "kernels": trainer.model_cfg.kernels,
            "kernels_requested": config.model.kernels, "devices": num_devices,
            "mesh": dict(zip(mesh.axis_names, mesh.axis_sizes)),
            "dtype": config.model.dtype, "remat": config.model.remat,
            "scan_layers": bool(config.model.scan_layers), "seq_len": config.data.seq_len,
            "packed": packed}
  if note:
    report["note"] = note
  report["cost_note"] = COST_NOTE
  host = abstract_host_batch(trainer.task, config.train.batch_size, config.data.seq_len,
                             config.data.seq_len, packed)
  state, frozen = trainer._abstract_state_and_base()  # pylint: disable=protected-access
  with trainer.on_mesh():
    batch = trainer.abstract_batch({k: np.zeros(v.shape, v.dtype) for k, v in host.items()})
    args = (state, frozen, batch)
    exported = _export(trainer._train_step, export_platform, *args)  # pylint: disable=protected-access
    cost = _cost(trainer._train_step, export_platform, *args)  # pylint: disable=protected-access
  report["train_step"] = _summary(exported, cost, ops)
  if trainer.task.name == "causal":
    report["decode_step"] = _lower_decode(trainer, ops, export_platform, decode_batch,
                                          decode_len)
  return report


def _lower_decode(trainer, ops, platform, batch, length):
  """One decode step (lm/decode.py's, one token per row) of `batch` rows whose cache has
  `length` slots, from the state a prefill of one-token prompts leaves."""
  model, params = trainer.model, trainer.setup.abstract_params

  def prefilled(params):
    return decode.prefill(model, params, [[1]] * batch, length - 1,
                          [decode.Sampling(temperature=0.0)] * batch, batch_size=batch)

  step = jax.jit(lambda p, s: decode._decode(model, p, s, jnp.int32(1)))  # pylint: disable=protected-access
  with trainer.on_mesh():
    state = jax.eval_shape(prefilled, params)
    exported = _export(step, platform, params, state)
    cost = _cost(step, platform, params, state)
  return {**_summary(exported, cost, ops), "rows": batch, "cache_slots": length}
