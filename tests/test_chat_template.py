"""Chat templates (lm/chat_template.py) rendered as transformers' apply_chat_template renders
them: SmolLM2's own (from its GGUF file) and templates in the shapes other families use."""

import pathlib

import gguf
import pytest
import transformers

from conftest import smollm2_file
from lm import chat_template
from lm.data.tokenizers import ByteTokenizer
from lm.errors import UserError
from lm.interop import gguf_tokenizer

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system and turns": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven is prime."},
        {"role": "user", "content": "And an even one? Réponds en français."}],
}


@pytest.fixture(scope="module")
def smollm2_tokenizers():
  path = pathlib.Path(smollm2_file())
  ours = gguf_tokenizer.read(gguf.GGUFReader(str(path)), str(path))
  theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  return ours, theirs


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_smollm2_s_template_renders_and_tokenizes_as_transformers(smollm2_tokenizers,
                                                                   conversation,
                                                                   generation_prompt):
  ours, theirs = smollm2_tokenizers
  messages = CONVERSATIONS[conversation]
  text = chat_template.render(ours.chat_template, messages, generation_prompt,
                              ours.special_tokens())
  assert text == theirs.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=generation_prompt)
  expected = theirs.apply_chat_template(messages, tokenize=True,
                                        add_generation_prompt=generation_prompt,
                                        return_dict=False)
  assert ours.chat_ids(text) == list(expected)
  if conversation == "one turn":  # SmolLM2's template adds its default system prompt
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


# Templates in the shapes of other families: bos from the tokenizer and a role check (Llama
# 3), loop controls and tojson of non-ASCII text, and {% generation %} (assistant masks).
TEMPLATES = {
    "llama3-like": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
        "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"),
    "loop controls and tojson": (
        "{% for message in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
        "{{ message['role'] }}: {{ message['content'] | tojson }}\n{% endfor %}"),
    "generation block": (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
        "{% else %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endif %}"
        "{% endfor %}"),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_templates_of_other_shapes_render_as_transformers(smollm2_tokenizers, name):
  ours, theirs = smollm2_tokenizers
  messages = CONVERSATIONS["system and turns"]
  text = chat_template.render(TEMPLATES[name], messages, True, ours.special_tokens())
  assert text == theirs.apply_chat_template(messages, chat_template=TEMPLATES[name],
                                            tokenize=False, add_generation_prompt=True)


def test_a_template_that_fails_is_one_line_naming_it_and_why():
  cases = {
      "{{ messages[0]['content'] }}{{ undefined_thing }}": "undefined_thing",
      "{% for m in messages %}{{ raise_exception('no system role here') }}{% endfor %}":
          "no system role here",
      "{% for m in messages %}{{ m['role'] }": "TemplateSyntaxError",
  }
  for template, reason in cases.items():
    with pytest.raises(UserError) as e:
      chat_template.render(template, CONVERSATIONS["one turn"], source="the template of X")
    message = str(e.value)
    assert message.startswith("the template of X: cannot render") and reason in message
    assert "\n" not in message
  with pytest.raises(UserError, match="has no chat template"):
    chat_template.render(None, CONVERSATIONS["one turn"])
  with pytest.raises(UserError, match="message 0 has no role"):
    chat_template.render(chat_template.CHATML, [{"content": "hi"}])


def test_lm_trained_models_chat_in_chatml():
  tok = ByteTokenizer()
  messages = CONVERSATIONS["system and turns"][:2]
  text = chat_template.render(tok.chat_template, messages, True, tok.special_tokens())
  assert text == ("<|im_start|>system\nYou answer in one sentence.<|im_end|>\n"
                  "<|im_start|>user\nName a prime.<|im_end|>\n<|im_start|>assistant\n")
  assert tok.chat_ids(text) == [tok.bos_id] + list(text.encode("utf-8"))
