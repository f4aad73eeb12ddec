"""Today's decoder families against transformers on small random configs: Mistral (sliding
window), Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms, own head size), Gemma 2 (GeGLU,
(1 + w) sandwich norms, sqrt(d) embeddings, soft caps, local/global layers) and Gemma 3 (q/k
norms, a RoPE base per layer kind). Each: imported logits equal transformers', greedy
decoding through lm's KV cache equals transformers' `generate` past the window, and the
export reads back into transformers with the same logits.

Windows are small (4 tokens) and sequences longer, soft caps low and weights large enough
that every feature moves the logits: a mapping or a mask off by one fails here."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import STDLIB_TEXT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm import decode  # noqa: E402
from lm.errors import UserError  # noqa: E402
from lm.inference import load  # noqa: E402
from lm.interop import hf  # noqa: E402

VOCAB, WINDOW = 300, 4
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
FAMILIES = {
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=WINDOW, rope_theta=500.0, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(rope_theta=500.0, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(head_dim=16, rope_theta=500.0, tie_word_embeddings=False)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=12,
                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                    rope_theta=500.0)),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                    dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=12,
                         sliding_window_pattern=2, final_logit_softcapping=3.0,
                         rope_parameters={"full_attention": {"rope_type": "default",
                                                             "rope_theta": 5000.0},
                                          "sliding_attention": {"rope_type": "default",
                                                                "rope_theta": 50.0}})),
}


@pytest.fixture(scope="module")
def sentencepiece_file(tmp_path_factory):
  """One small SentencePiece model for every family's folder (the tokenizer is not what
  these tests are about; tests/test_interop.py and test_gguf.py check tokenizers)."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  folder = tmp_path_factory.mktemp("spm")
  with open(STDLIB_TEXT, encoding="utf-8") as f:
    lines = f.read()[:100_000].splitlines()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=VOCAB,
      model_type="bpe", minloglevel=2, unk_id=3, bos_id=1, eos_id=2, pad_id=0)
  return str(folder / "tokenizer.model")


@pytest.fixture(scope="module")
def byte_bpe_file(tmp_path_factory):
  """A byte-level BPE tokenizer.json (the tokenizer GGUF export writes)."""
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=import-outside-toplevel
  with open(STDLIB_TEXT, encoding="utf-8") as f:
    text = f.read()[:60_000]
  tok = ByteLevelBPETokenizer()
  tok.train_from_iterator([text], vocab_size=VOCAB, show_progress=False,
                          special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
  path = str(tmp_path_factory.mktemp("bpe") / "tokenizer.json")
  tok.save(path)
  return path


def hf_model(family, folder, tokenizer_file, **changes):
  """A random transformers model of `family` saved in `folder` with the tokenizer file;
  norms and biases moved off their initial ones and zeros, so that a norm or bias mapped
  wrongly shows. `changes`: to the family's config."""
  config_class, model_class, extra = FAMILIES[family]
  config = config_class(**COMMON, **{**extra, **changes})
  torch.manual_seed(0)
  model = model_class(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(folder)
  shutil.copy(tokenizer_file, os.path.join(folder, os.path.basename(tokenizer_file)))
  return model


def _logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_imports_decodes_and_exports_as_transformers(family, sentencepiece_file,
                                                            tmp_path, one_device):
  folder = str(tmp_path / "hf")
  model = hf_model(family, folder, sentencepiece_file)
  hf.import_checkpoint(folder, str(tmp_path / "lm"))
  loaded = load(str(tmp_path / "lm"), devices=one_device)
  rng = np.random.default_rng(0)
  ids = rng.integers(4, VOCAB, (2, 14)).tolist()  # 14 tokens: several windows
  reference = _logits(model, ids)
  assert np.abs(reference).max() > 1.0  # the logits are far from uniform: the test can fail
  ours = loaded.model.apply({"params": loaded.params}, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(ours), reference, atol=2e-4)

  prompt = ids[0][:5]
  generated = decode.generate(loaded.model, loaded.params, [prompt], 12,
                              decode.Sampling(temperature=0.0))
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              pad_token_id=0)
  assert generated[0] == expected[0, len(prompt):].tolist()

  hf.export_checkpoint(str(tmp_path / "lm"), str(tmp_path / "back"))
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
  assert type(again) is type(model)
  np.testing.assert_allclose(_logits(again, ids), reference, atol=1e-5)


def test_gemma3_vision_language_config_is_named(tmp_path):
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / "config.json").write_text('{"model_type": "gemma3", "text_config": {}}')
  (folder / "model.safetensors").write_bytes(b"")
  with pytest.raises(UserError, match="gemma3_text"):
    hf.import_checkpoint(str(folder), str(tmp_path / "lm"))
  assert not (tmp_path / "lm").exists()


def test_irregular_layer_pattern_is_named(sentencepiece_file, tmp_path):
  folder = str(tmp_path / "hf")
  config = transformers.MistralConfig(**COMMON, sliding_window=WINDOW)
  config.layer_types = ["sliding_attention", "full_attention", "full_attention",
                        "sliding_attention"]
  transformers.MistralForCausalLM(config).save_pretrained(folder)
  shutil.copy(sentencepiece_file, os.path.join(folder, "tokenizer.model"))
  with pytest.raises(UserError, match="layer_types"):
    hf.import_checkpoint(folder, str(tmp_path / "lm"))
  assert not (tmp_path / "lm").exists()


# GGUF: what transformers' GGUF reader does not read (Gemma's soft caps, query scaling and
# layer pattern; Qwen3's head size) it takes from its config defaults, as llama.cpp derives
# them; the second model of each family keeps to those, so that transformers can check the
# names, the stored (1 + w) norms and the unpermuted RoPE rows lm writes.
AS_TRANSFORMERS_READS_GGUF = {
    "qwen2": {}, "qwen3": dict(head_dim=128),
    "gemma2": dict(query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3_text": dict(query_pre_attn_scalar=256, sliding_window_pattern=6,
                        final_logit_softcapping=None, rope_parameters=None, rope_theta=5000.0),
}


@pytest.mark.parametrize("family", sorted(AS_TRANSFORMERS_READS_GGUF))
def test_family_gguf_export_reads_back_in_lm_and_transformers(family, byte_bpe_file, tmp_path,
                                                              one_device):
  ids = np.random.default_rng(1).integers(4, VOCAB, (1, 14)).tolist()
  for variant, changes in (("lm", {}), ("transformers", AS_TRANSFORMERS_READS_GGUF[family])):
    folder, workdir = str(tmp_path / f"hf-{variant}"), str(tmp_path / f"lm-{variant}")
    model = hf_model(family, folder, byte_bpe_file, **changes)
    hf.import_checkpoint(folder, workdir)
    path = str(tmp_path / f"{variant}.gguf")
    hf.export_checkpoint(workdir, path)
    if variant == "lm":  # every feature, through lm's own reader
      hf.import_checkpoint(path, str(tmp_path / "again"))
      again = load(str(tmp_path / "again"), devices=one_device)
      np.testing.assert_allclose(np.asarray(again.model.apply(
          {"params": again.params}, jnp.asarray(ids))), _logits(model, ids), atol=2e-4)
    else:
      reread = transformers.AutoModelForCausalLM.from_pretrained(
          str(tmp_path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
      np.testing.assert_allclose(_logits(reread, ids), _logits(model, ids), atol=1e-4)
