"""Chat templates: a checkpoint's own Jinja template, rendered as transformers'
`apply_chat_template` renders it, in a sandbox.

    text = chat_template.render(template, messages, add_generation_prompt=True,
                                special_tokens={"bos_token": "<s>", "eos_token": "</s>"})

The environment is the one transformers uses: sandboxed and immutable (a template cannot
reach Python objects or change its inputs), `trim_blocks` and `lstrip_blocks`, loop
controls, `raise_exception(message)`, `strftime_now(format)`, a `tojson` filter that keeps
non-ASCII text, and the `{% generation %}` block some templates mark assistant text with.
Unlike transformers, an undefined variable is an error (`is defined` tests still work): a
template's typo should not silently drop text. Any failure is one UserError line naming the
template's source and the reason.

Models lm trains get CHATML, the template of SmolLM2, Qwen and many others.
"""

import datetime
import functools
import json

import jinja2
from jinja2 import ext, nodes, sandbox

from lm.errors import UserError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


class _Generation(ext.Extension):
  """`{% generation %}...{% endgeneration %}`: transformers tracks which characters are the
  assistant's with it; rendering, it is its body."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compiled(template):
  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined,
      extensions=[_Generation, ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def render(template, messages, add_generation_prompt=False, special_tokens=None,
           source="the chat template", **variables):
  """The conversation `messages` ([{"role", "content"}, ...]) as the template writes it.
  `special_tokens`: bos_token, eos_token, ... as strings (transformers passes the
  tokenizer's); `variables`: more template inputs (tools, documents, ...)."""
  if not template:
    raise UserError(f"{source}: the checkpoint has no chat template")
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or "role" not in message:
      raise UserError(f"{source}: message {i} has no role")
  try:
    return _compiled(template).render(messages=messages,
                                      add_generation_prompt=add_generation_prompt,
                                      **(special_tokens or {}), **variables)
  except jinja2.exceptions.TemplateError as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f"{source}: cannot render ({type(e).__name__}: {reason})") from None
  except (TypeError, ValueError, KeyError, IndexError) as e:
    raise UserError(f"{source}: cannot render ({type(e).__name__}: {e})") from None
