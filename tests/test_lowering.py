"""The accelerator programs, proven on a CPU: a tiny config's train step (bfloat16, scanned
layers, remat, on a data x fsdp x tensor mesh of 8 abstract devices) and decode step,
exported with jax.export for TPU and for GPU (CUDA) with the kernels chosen there."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, tiny_config, user_env
from lm import lowering
from lm.models import kernels


def accelerator_config(**overrides):
  """bfloat16, scanned and rematerialised, lengths a Pallas block divides, GQA."""
  return tiny_config(**{
      "model.dtype": "bfloat16", "model.scan_layers": True, "model.remat": "full",
      "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4,
      "model.num_kv_heads": 2, "model.d_ff": 128, "model.positions": "rope",
      "data.seq_len": 128, "model.max_len": 128, "train.batch_size": 8,
      "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, **overrides})


@pytest.fixture(scope="module")
def tpu_report():
  return lowering.lower(accelerator_config(), "tpu", vocab_size=64, num_devices=8)


def test_the_tpu_train_step_lowers_with_splash_attention(tpu_report):
  report = tpu_report
  assert (report["platform"], report["kernels"], report["devices"]) == ("tpu", "splash", 8)
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  step = report["train_step"]
  # Two layers scanned: the kernel appears in the scan body (forward, dq and dkv passes).
  assert step["kernel_calls_found"] == ["tpu_custom_call"]
  assert step["custom_calls"]["tpu_custom_call"] >= 3
  assert step["cpu_barrier_copies"] == 0


def test_the_tpu_decode_step_lowers_without_cpu_copies(tpu_report):
  decode = tpu_report["decode_step"]
  assert decode["cpu_barrier_copies"] == 0
  assert decode["rows"] == 8 and decode["cache_slots"] == 256


def test_the_gpu_train_and_decode_steps_lower_with_triton_flash_attention():
  report = lowering.lower(accelerator_config(**{"model.kernels": "pallas_gpu"}), "gpu",
                          vocab_size=64, num_devices=8)
  assert (report["platform"], report["kernels"]) == ("cuda", "pallas_gpu")
  assert report["train_step"]["kernel_calls_found"] == ["__gpu$xla.gpu.triton"]
  assert report["train_step"]["cpu_barrier_copies"] == 0
  assert report["decode_step"]["cpu_barrier_copies"] == 0


@pytest.mark.skipif(not kernels.get("cudnn").available(),
                    reason="cuDNN's library is not installed (jax[cuda12]: its nvidia-cudnn "
                    "wheel lets cuDNN's attention lower without a GPU)")
def test_the_gpu_train_step_lowers_with_cudnn_attention():
  """cuDNN's attention partitions itself through a Python callback when compiled, so it
  lowers on one device only (a CPU device stands in; the program is CUDA's all the same)."""
  report = lowering.lower(accelerator_config(**{"model.kernels": "cudnn"}), "gpu",
                          vocab_size=64, packed=False)
  assert (report["kernels"], report["devices"]) == ("cudnn", 1) and "one device" in report["note"]
  calls = report["train_step"]["custom_calls"]
  assert any(name.startswith("__cudnn$fmha") for name in calls), calls
  assert report["train_step"]["cpu_barrier_copies"] == 0


def test_the_check_can_fail_the_cpu_kernels_copy_through_barriers():
  report = lowering.lower(accelerator_config(**{"model.kernels": "cpu"}), "cpu",
                          vocab_size=64, num_devices=8)
  assert report["kernels"] == "cpu" and report["train_step"]["cpu_barrier_copies"] > 0
  assert report["train_step"]["kernel_calls_found"] == []


def test_the_plan_command_lowers_any_config():
  tiny = ["--config.model.num_layers=2", "--config.model.d_model=64",
          "--config.model.num_heads=4", "--config.model.num_kv_heads=4",
          "--config.model.d_ff=128", "--config.data.seq_len=256", "--config.model.max_len=256",
          "--config.train.batch_size=4"]
  out = subprocess.run([sys.executable, "-m", "lm.plan", f"--config={REPO}/experiments/gpt_1b.py",
                        "--hardware=tpu_v5p", "--devices=4", "--lower", *tiny], cwd=REPO,
                       env=user_env(), capture_output=True, text=True, timeout=300, check=True)
  lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  plan, lowered = lines[0], lines[1]["lowering"]
  assert plan["plan"]["kernels"] == lowered["kernels"] == "splash"
  assert plan["plan"]["attention"] == "fused"
  assert lowered["train_step"]["kernel_calls_found"] == ["tpu_custom_call"]
  assert "fused attention: splash kernels" in out.stdout
