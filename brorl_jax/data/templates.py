"""Chat templates: jinja rendering that matches transformers.

A chat template (the `chat_template` of a Hugging Face `tokenizer_config.json`,
or `chat_template.jinja`) is a jinja program over `messages`. This module
renders it the way `transformers`' `apply_chat_template(..., tokenize=False)`
does (transformers 5.x, `utils/chat_template_utils.py`): a sandboxed
environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, its `tojson` filter (no HTML escaping), the `raise_exception`,
`strftime_now`, `dict` and `namespace` globals, message keys whose value is
None dropped, and the tokenizer's named special tokens (`bos_token`,
`eos_token`, ...) passed as variables. The `{% generation %}` tag is accepted
and renders its body (we never need the assistant-token mask).

`DEFAULT_CHAT_TEMPLATE` is ChatML, the template transformers used as its
default before templates became mandatory; SentencePiece tokenizers trained
for the CPU demo use it unless given another.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Names a message's reasoning may come under; transformers copies the first
# one found to `reasoning_content` (and `thinking`) before rendering.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
  """A chat template failed to compile or render (message says which)."""


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: renders the body unchanged."""

  tags: ClassVar[set[str]] = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(
        self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


class _Namespace(jinja2.utils.Namespace):
  """`namespace(...)` that refuses underscore names, as transformers does."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"chat templates cannot set underscore attributes ({name!r})")


class _Dict:
  """`dict(...)` for templates without exposing the builtin type."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None,
            sort_keys=False):
  # jinja's own tojson escapes HTML characters; transformers' does not.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                    separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
  """Compiles a chat template (cached).

  Args:
    template: the jinja source.

  Returns:
    The compiled template.

  Raises:
    ChatTemplateError: the source is not valid jinja.
  """
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _Dict()
  env.globals["namespace"] = _Namespace
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ChatTemplateError(
        f"chat template does not compile (line {e.lineno}): {e.message}"
    ) from e


def _normalize_messages(
    messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Copies messages, dropping None values and aliasing reasoning fields."""
  if not messages:
    raise ChatTemplateError("cannot render an empty conversation")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ChatTemplateError(
          f"message {i} must be a mapping with 'role' and 'content', got "
          f"{type(message).__name__}")
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message),
                     None)
    if reasoning is not None:
      message = {"thinking": reasoning, **message,
                 "reasoning_content": reasoning}
    out.append(message)
  return out


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> str:
  """Renders `messages` with a chat template, as transformers does.

  Args:
    template: the jinja source (e.g. `tokenizer.chat_template`).
    messages: dicts with at least `role` and `content`.
    add_generation_prompt: end with the header that opens an assistant turn
      (e.g. `<|im_start|>assistant\\n`, or `<｜Assistant｜><think>\\n` for
      R1-Distill), so the model's continuation is the answer.
    special_tokens: the named special tokens as strings (`bos_token`,
      `eos_token`, `pad_token`, `unk_token`, ...); templates read them.
    **kwargs: further template variables; they override `special_tokens`.

  Returns:
    The rendered prompt text. Tokenize it without adding a bos token: the
    template writes any it needs.

  Raises:
    ChatTemplateError: the template is invalid or raised an exception.
  """
  compiled = compile_template(template)
  variables = {**dict(special_tokens or {}), **kwargs}
  variables.setdefault("tools", None)
  variables.setdefault("documents", None)
  try:
    return compiled.render(messages=_normalize_messages(messages),
                           add_generation_prompt=add_generation_prompt,
                           **variables)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f"chat template failed to render: {e}") from e
