"""The kernel seam (lm/models/kernels): every implementation that runs here against an
independent computation, in values and gradients, and the choice of one per platform.

The Pallas kernels (TPU splash attention, the GPU Triton flash attention) run in Pallas's
interpreter on this CPU: the same kernel code the accelerators compile, on small shapes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import schema
from lm.errors import ConfigError
from lm.models import Decoder, ModelConfig, kernels
from lm.models.kernels import Mask, reference
from lm.models.kernels import cpu as cpu_kernels

HERE = ("xla", "cpu", "splash+interpret", "pallas_gpu+interpret")


def numpy_attention(q, k, v, causal, q_seg=None, kv_seg=None, window=0, cap=0.0):
  """float64 attention: q [B, L, H, Dh], k/v [B, S, K, Dh]; query head h uses key head
  h // (H/K); query l sees key s when causal allows it, the segment ids agree and (with a
  window) l - window < s; `cap`: scores soft-capped, cap * tanh(score / cap)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
  if cap:
    logits = cap * np.tanh(logits / cap)
  length, kv_length = q.shape[1], k.shape[1]
  seen = np.ones((q.shape[0], 1, length, kv_length), bool)
  if causal:
    seen &= np.tril(np.ones((length, kv_length), bool))
  if window:
    seen &= np.arange(kv_length)[None, :] > np.arange(length)[:, None] - window
  if q_seg is not None:
    seen &= (np.asarray(q_seg)[:, None, :, None] == np.asarray(kv_seg)[:, None, None, :])
  logits = np.where(seen, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhls,bshd->blhd", probs, v)


def qkv(heads, kv_heads, length=128, kv_length=None, dh=32, batch=2, dtype=jnp.float32):
  kv_length = kv_length or length
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, dh))
  k, v = (jax.random.normal(key, (batch, kv_length, kv_heads, dh)) for key in keys[1:])
  return tuple(x.astype(dtype) for x in (q, k, v))


# Row 0: three documents, the last one padding (segment 0); row 1: one document.
SEGMENTS = jnp.asarray([[1] * 50 + [2] * 60 + [0] * 18, [3] * 128], jnp.int32)
MASKS = {
    "causal": lambda: Mask(causal=True),
    "causal, packed": lambda: Mask(SEGMENTS, causal=True),
    "bidirectional, padded": lambda: Mask(SEGMENTS),
    "causal, packed, window": lambda: Mask(SEGMENTS, causal=True, window=20),
}


def _grads(attention, q, k, v, mask):
  weights = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
  loss = lambda q, k, v: jnp.sum(attention(q, k, v, mask).astype(jnp.float32) * weights)
  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _autodiff(q, k, v, mask):
  """The materialised maths through jax's own autodiff: an independent gradient."""
  return reference.materialised_attention(q, k, v, mask)


@pytest.mark.parametrize("name", HERE)
@pytest.mark.parametrize("case", list(MASKS))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_attention_matches_float64_and_autodiff_gradients(name, case, heads, kv_heads):
  ops, mask = kernels.get(name), MASKS[case]()
  q, k, v = qkv(heads, kv_heads)
  segs = (SEGMENTS, SEGMENTS) if mask.has_segments else (None, None)
  out = jax.jit(ops.attention)(q, k, v, mask)
  chex.assert_shape(out, q.shape)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, mask.causal, *segs, mask.window),
                             atol=2e-5)
  chex.assert_trees_all_close(jax.jit(lambda *a: _grads(ops.attention, *a))(q, k, v, mask),
                              _grads(_autodiff, q, k, v, mask), atol=5e-5)


@pytest.mark.parametrize("name", HERE)
def test_soft_capped_scores_match_float64_in_training_and_decoding(name):
  """Gemma 2's soft cap (a score transform no fused kernel here takes) on every kernel,
  and over a KV cache; the scores are scaled up so that the cap bites."""
  ops = kernels.get(name)
  q, k, v = qkv(4, 2)
  q = q * 4.0
  expected = numpy_attention(q, k, v, True, cap=2.0)
  assert np.abs(expected - numpy_attention(q, k, v, True)).max() > 0.1
  np.testing.assert_allclose(jax.jit(lambda *a: ops.attention(*a, softcap=2.0))(
      q, k, v, Mask(causal=True)), expected, atol=2e-5)
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  dense = Mask(causal=True).dense(q.shape[1], k.shape[1])
  np.testing.assert_allclose(ops.cached_attention(q, heads_first(k), heads_first(v), dense,
                                                  softcap=2.0), expected, atol=2e-5)


@pytest.mark.parametrize("name", HERE)
def test_bfloat16_attention_stays_close_to_float32(name):
  ops, mask = kernels.get(name), Mask(SEGMENTS, causal=True)
  q, k, v = qkv(4, 2, dtype=jnp.bfloat16)
  out = jax.jit(ops.attention)(q, k, v, mask)
  assert out.dtype == jnp.bfloat16
  exact = numpy_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                          True, SEGMENTS, SEGMENTS)
  np.testing.assert_allclose(out.astype(jnp.float32), exact, atol=3e-2)
  f32 = lambda x: x.astype(jnp.float32)
  ours = jax.jit(lambda *a: _grads(ops.attention, *a))(q, k, v, mask)
  chex.assert_trees_all_close(jax.tree.map(f32, ours),
                              _grads(_autodiff, f32(q), f32(k), f32(v), mask), atol=0.1)


@pytest.mark.parametrize("name", HERE)
def test_cross_attention_and_odd_lengths(name):
  """Queries of one length over keys of another (cross-attention; the Pallas kernels hand
  it to the reference) and a length no Pallas block divides."""
  ops = kernels.get(name)
  q, k, v = qkv(4, 2, length=24, kv_length=40)
  memory = jnp.asarray([[1] * 33 + [0] * 7, [1] * 40], jnp.int32)
  mask = Mask(jnp.ones((2, 24), jnp.int32), memory)
  np.testing.assert_allclose(ops.attention(q, k, v, mask),
                             numpy_attention(q, k, v, False, np.ones((2, 24)), memory),
                             atol=2e-5)
  q, k, v = qkv(4, 2, length=40)
  np.testing.assert_allclose(ops.attention(q, k, v, Mask(causal=True)),
                             numpy_attention(q, k, v, True), atol=2e-5)
  # Lengths the Pallas blocks divide: splash runs cross-attention itself.
  q, k, v = qkv(4, 2, length=128, kv_length=256)
  memory = jnp.asarray([[1] * 200 + [0] * 56, [1] * 256], jnp.int32)
  mask = Mask(jnp.ones((2, 128), jnp.int32), memory)
  np.testing.assert_allclose(ops.attention(q, k, v, mask),
                             numpy_attention(q, k, v, False, np.ones((2, 128)), memory),
                             atol=2e-5)


def test_dropout_and_weights_run_materialised_for_every_kernel():
  q, k, v = qkv(4, 2)
  seen = []
  for name in HERE:
    out = kernels.get(name).attention(q, k, v, Mask(causal=True), sow=seen.append)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, True), atol=2e-5)
  chex.assert_shape(jnp.stack(seen), (len(HERE), 2, 4, 128, 128))  # weights [B, H, L, S]
  dropped = kernels.get("splash+interpret").attention(
      q, k, v, Mask(causal=True), dropout_rate=0.5, dropout_rng=jax.random.key(1))
  assert np.abs(dropped - numpy_attention(q, k, v, True)).max() > 0.1


def test_splash_under_shard_map_on_a_data_fsdp_tensor_mesh():
  """On 8 devices (2 x 2 x 2) the kernel runs per shard (batch over data x fsdp, heads over
  tensor) and gives the unsharded answer."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  q, k, v = qkv(4, 2, batch=4)
  segments = jnp.concatenate([SEGMENTS, SEGMENTS[::-1]])
  mask = Mask(segments, causal=True)
  ops = kernels.get("splash+interpret")
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None,
                                                                      "tensor"))
  with jax.set_mesh(mesh):
    placed = jax.device_put((q, k, v), spec)
    out = jax.jit(ops.attention)(*placed, mask)
    text = jax.jit(ops.attention).lower(*placed, mask).as_text()
  assert "shard_map" in text or "manual" in text
  np.testing.assert_allclose(out, numpy_attention(q, k, v, True, segments, segments), atol=2e-5)


@pytest.mark.parametrize("name", ["xla", "cpu"])
def test_matmul_backward_pass_runs_in_the_compute_dtype(name):
  ops = kernels.get(name)
  x = jax.random.normal(jax.random.key(0), (24, 16))
  w = jax.random.normal(jax.random.key(1), (16, 8))
  g = jax.random.normal(jax.random.key(2), (24, 8))
  grads = lambda f, dtype: jax.grad(lambda x, w: jnp.sum(f(x.astype(dtype), w.astype(dtype))
                                                         * g), argnums=(0, 1))(x, w)
  # float32: exactly the usual gradients, g w^T and x^T g.
  chex.assert_trees_all_close(grads(ops.matmul, jnp.float32), (g @ w.T, x.T @ g), atol=1e-5)
  # bfloat16: products of bfloat16-rounded operands (the cotangent rounded too), float32 sums.
  bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
  dx, dw = grads(ops.matmul, jnp.bfloat16)
  assert dx.dtype == dw.dtype == jnp.float32
  np.testing.assert_allclose(dx, bf(bf(g) @ bf(w).T), rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(dw, bf(bf(x).T @ bf(g)), rtol=2e-2, atol=2e-2)
  # matmul_nt(x, v) = x @ v^T for a weight stored [N, K] (a tied embedding): the same rules.
  v = w.T
  nt = lambda dtype: jax.grad(lambda x, v: jnp.sum(ops.matmul_nt(
      x.astype(dtype), v.astype(dtype)) * g), argnums=(0, 1))(x, v)
  np.testing.assert_allclose(ops.matmul_nt(x, v), x @ w, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(nt(jnp.float32), (g @ v, g.T @ x), atol=1e-5)
  dx, dv = nt(jnp.bfloat16)
  np.testing.assert_allclose(dx, bf(bf(g) @ bf(v)), rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(dv, bf(bf(g).T @ bf(x)), rtol=2e-2, atol=2e-2)


def test_only_the_cpu_kernels_copy_through_a_barrier():
  x, w = jnp.ones((8, 4), jnp.bfloat16), jnp.ones((4, 2), jnp.bfloat16)
  hlo = lambda ops: jax.jit(jax.grad(lambda x, w: ops.matmul(x, w).sum(), argnums=1)).lower(
      x, w).as_text()
  assert "optimization_barrier" in hlo(kernels.get("cpu"))
  assert "optimization_barrier" not in hlo(kernels.get("xla"))
  assert cpu_kernels.matmul is not reference.matmul


@pytest.mark.parametrize("name", ["splash+interpret", "pallas_gpu+interpret", "cpu"])
def test_a_decoder_on_a_kernel_equals_the_portable_one(name):
  """Logits and gradients of a whole (packed, GQA) decoder: the kernel against xla."""
  base = dict(vocab_size=50, num_layers=2, num_heads=4, num_kv_heads=2, d_model=64, d_ff=64,
              max_len=128, positions="rope")
  tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, 50)
  xla_model, model = (Decoder(ModelConfig(**base, kernels=n)) for n in ("xla", name))
  params = xla_model.init(jax.random.key(0), tokens)["params"]
  loss = lambda m: lambda p: m.apply({"params": p}, tokens, None, SEGMENTS).mean()
  chex.assert_trees_all_close(jax.jit(jax.value_and_grad(loss(model)))(params),
                              jax.jit(jax.value_and_grad(loss(xla_model)))(params), atol=2e-5)


def test_auto_chooses_by_platform_and_dropout():
  choose = lambda platform, **kw: kernels.choose("auto", platform, **{
      "dtype": "bfloat16", "head_dim": 64, **kw})
  assert choose("cpu") == "cpu"
  assert choose("tpu") == "splash"
  assert choose("gpu") == ("cudnn" if kernels.get("cudnn").available() else "pallas_gpu")
  assert choose("cuda", dtype="float32") == "pallas_gpu"
  assert choose("tpu", dropout=0.1) == choose("gpu", dropout=0.1) == "xla"
  assert choose("gpu", head_dim=96, dtype="float32") == "xla"  # Triton wants a power of two


@pytest.mark.parametrize("requested,platform,kw,message", [
    ("splash", "cpu", {}, "splash runs on tpu, and this mesh is cpu"),
    ("cpu", "tpu", {}, "cpu runs on cpu, and this mesh is tpu"),
    ("cudnn", "gpu", {"dtype": "float32"}, "cudnn attention takes bfloat16/float16"),
    ("cudnn", "gpu", {"head_dim": 256}, "does not take head size 256"),
    ("splash", "tpu", {"dropout": 0.1}, "fused attention kernel without dropout"),
])
def test_a_kernel_that_does_not_fit_is_a_one_line_config_error(requested, platform, kw,
                                                               message):
  config = {"kernels": requested, "dtype": "bfloat16", "d_model": 128, "num_heads": 2,
            "dropout": 0.0}
  config.update({k: v for k, v in kw.items() if k in ("dtype", "dropout")})
  if "head_dim" in kw:
    config["d_model"] = kw["head_dim"] * 2
  import ml_collections  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError) as e:
    ModelConfig.from_config(ml_collections.ConfigDict(config), 10, platform)
  assert str(e.value).startswith("config.model.kernels: ") and message in str(e.value)
  assert "\n" not in str(e.value)


def test_the_schema_lists_every_implementation_and_models_never_hold_auto():
  assert schema.KERNELS == ("auto",) + tuple(kernels.IMPLEMENTATIONS)
  with pytest.raises(ValueError, match="never 'auto'"):
    ModelConfig(vocab_size=10, kernels="auto")
  assert ModelConfig(vocab_size=10).kernels == "xla"


def test_the_kv_cache_dtype_follows_the_kernels_not_the_machine():
  cfg = lambda name: ModelConfig(vocab_size=10, dtype="bfloat16", kernels=name)
  assert cfg("cpu").cache_dtype == jnp.float32 and cfg("cpu").caches_unembedding
  for name in ("xla", "splash", "cudnn", "pallas_gpu"):
    assert cfg(name).cache_dtype == jnp.bfloat16 and not cfg(name).caches_unembedding


def test_a_checkpoint_loads_with_this_machine_s_kernels(tmp_path, one_device):
  """A workdir trained elsewhere (its config naming TPU kernels) decodes here: loading
  chooses the kernels for this machine's platform."""
  import glob  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  from lm.inference import load  # pylint: disable=import-outside-toplevel
  from lm.loop import run  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"train.num_steps": 2, "sample.num_tokens": 0})
  run(config, str(tmp_path / "run"), devices=one_device)
  metas = glob.glob(str(tmp_path / "run" / "checkpoints" / "*" / "meta" / "metadata"))
  assert metas, "no checkpoint metadata written"
  for path in metas:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
    meta["config"]["model"]["kernels"] = "splash"
    with open(path, "w", encoding="utf-8") as f:
      json.dump(meta, f)
  loaded = load(str(tmp_path / "run"))
  assert loaded.model.cfg.kernels == "cpu"


def test_model_code_never_asks_which_backend_it_runs_on():
  """The platform reaches the models only through ModelConfig.kernels."""
  import pathlib  # pylint: disable=import-outside-toplevel
  models = pathlib.Path(kernels.__file__).parents[1]
  offenders = [str(p) for p in models.rglob("*.py")
               if "default_backend" in p.read_text(encoding="utf-8")]
  assert not offenders
