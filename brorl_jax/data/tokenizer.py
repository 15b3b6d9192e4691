"""Tokenizers: one interface over SentencePiece models and HF tokenizer dirs.

`tokenizer_loader.load_tokenizer(directory)` picks the kind from the files it
finds:

  tokenizer.json                  HF fast tokenizer (`tokenizers` package)
  tokenizer.model                 SentencePiece model
  vocab.json + merges.txt         Qwen2 byte-level BPE, built here (see
                                  `hf_tokenizer.build_qwen2_bpe`), with the
                                  added tokens of tokenizer_config.json

`tokenizer.json` wins when both it and `tokenizer.model` are present (Llama
style HF folders ship both; only the former carries the added tokens).
`tokenizer_config.json` beside them supplies bos/eos/pad and the jinja chat
template; `train_sentencepiece` builds the CPU demo's tokenizer.

Padding: in the R1-Distill tokenizer pad == eos (151643), so a pad id is also
a real token. Padding masks must come from sequence lengths, never from
`tokens == pad_id`.

Decoding drops ids outside `[0, vocab_size)`: model checkpoints have more
embedding rows (151,936 for Qwen2) than the tokenizer has tokens (151,665),
and such ids have no text.
"""

from __future__ import annotations

import abc
import io
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import sentencepiece as spm

from brorl_jax.data import templates

# Tokens that end an assistant turn in the chat formats we know; each one the
# vocabulary has is added to `stop_ids` besides eos. (Qwen2.5-Instruct's
# generation_config stops on both <|im_end|> and <|endoftext|>.)
TURN_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>",
                   "<|end_of_text|>", "<｜end▁of▁sentence｜>")

# Demo defaults: ChatML markers (the default template's), reasoning tags and
# a newline piece. The ChatML markers are special: dropped by decode().
DEFAULT_USER_SYMBOLS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>",
                        "\n")
DEFAULT_SPECIAL_SYMBOLS = ("<|im_start|>", "<|im_end|>")

CONFIG_FILE = "tokenizer_config.json"
SPM_FILE = "tokenizer.model"


class TokenizerError(ValueError):
  """A tokenizer folder or file that cannot be used (message says why)."""


class Tokenizer(abc.ABC):
  """Text <-> token ids, special ids and the chat template.

  Attributes:
    vocab_size: number of ids the tokenizer can produce, added tokens
      included (151,665 for Qwen2.5). The model's embedding may be larger.
    bos_id: beginning-of-sequence id, or None (Qwen2.5 has none).
    eos_id: end-of-sequence id.
    pad_id: id used to left-pad prompts; eos when the config names no pad.
      May equal eos_id: build masks from lengths, not from `== pad_id`.
    stop_ids: ids that end a completion: eos plus the turn-end tokens of
      `TURN_END_TOKENS` present in the vocabulary (and, for HF folders, the
      eos ids of a `generation_config.json` beside the tokenizer).
    chat_template: jinja source used by `apply_chat_template`.
  """

  vocab_size: int
  bos_id: int | None
  eos_id: int
  pad_id: int
  stop_ids: tuple[int, ...]
  chat_template: str

  @abc.abstractmethod
  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of `text`; the text of a special token maps to its id.

    Args:
      text: the text to encode.
      add_bos: prepend `bos_id` (an error when the tokenizer has none).
        Chat-template output already contains any bos it needs.

    Returns:
      The ids.
    """

  def encode_batch(self, texts: Sequence[str],
                   add_bos: bool = False) -> list[list[int]]:
    """`encode` of each text."""
    return [self.encode(t, add_bos=add_bos) for t in texts]

  @abc.abstractmethod
  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    """Text of `ids`.

    Args:
      ids: token ids (a list or a 1-D integer array); ids outside
        `[0, vocab_size)` are dropped.
      skip_special: drop special tokens (eos, pad, ChatML markers, ...).

    Returns:
      The text.
    """

  def decode_batch(self, batch: Iterable[Iterable[int]],
                   skip_special: bool = True) -> list[str]:
    """`decode` of each id sequence."""
    return [self.decode(ids, skip_special=skip_special) for ids in batch]

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int | None:
    """Id of a vocabulary token (e.g. `"</think>"`), or None."""

  @abc.abstractmethod
  def id_to_token(self, token_id: int) -> str | None:
    """Vocabulary string of an id, or None when out of range."""

  @property
  @abc.abstractmethod
  def special_tokens_map(self) -> dict[str, str]:
    """Named special tokens as strings (`bos_token`, `eos_token`, ...)."""

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True) -> str:
    """Renders a conversation to prompt text, as transformers does.

    Args:
      messages: dicts with `role` and `content`.
      add_generation_prompt: end with the opening of an assistant turn.

    Returns:
      The text; `encode` it with `add_bos=False`.
    """
    return templates.render_chat_template(
        self.chat_template, messages,
        add_generation_prompt=add_generation_prompt,
        special_tokens=self.special_tokens_map)

  @abc.abstractmethod
  def save(self, directory: str | os.PathLike) -> None:
    """Writes the files that `tokenizer_loader.load_tokenizer` reloads."""

  def _bos_prefix(self, add_bos: bool) -> list[int]:
    if not add_bos:
      return []
    if self.bos_id is None:
      raise TokenizerError(
          "add_bos=True but this tokenizer has no bos token; set "
          "data.add_bos=False (chat templates write their own bos)")
    return [self.bos_id]


def stop_ids_for(eos_id: int, token_to_id: Callable[[str], int | None],
                 extra: Iterable[int] = ()) -> tuple[int, ...]:
  """eos, then `extra`, then the known turn-end tokens found; no repeats."""
  ids = [eos_id, *extra]
  ids += [i for i in map(token_to_id, TURN_END_TOKENS) if i is not None]
  return tuple(dict.fromkeys(ids))


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model with special ids and a chat template.

  Special tokens are the model's control pieces (pad, bos, eos) and the
  user-defined pieces listed in `special_tokens` (the ChatML markers by
  default); `decode(skip_special=True)` drops them.
  """

  def __init__(self, model_proto: bytes, *, chat_template: str | None = None,
               special_tokens: Sequence[str] = DEFAULT_SPECIAL_SYMBOLS):
    """Wraps a serialized model.

    Args:
      model_proto: the bytes of a `tokenizer.model` file.
      chat_template: jinja source; None gives `DEFAULT_CHAT_TEMPLATE`.
      special_tokens: user-defined pieces treated as special; those not in
        the vocabulary are ignored.
    """
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    sp = self._sp
    self.vocab_size = sp.get_piece_size()
    if sp.eos_id() < 0:
      raise TokenizerError("the SentencePiece model has no eos piece; train "
                           "it with eos_id >= 0")
    self.eos_id = sp.eos_id()
    self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
    self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.eos_id
    self.chat_template = chat_template or templates.DEFAULT_CHAT_TEMPLATE
    self.special_tokens = tuple(
        t for t in special_tokens if self.token_to_id(t) is not None)
    self._special_ids = frozenset(
        [i for i in range(self.vocab_size) if sp.is_control(i)]
        + [self.token_to_id(t) for t in self.special_tokens])
    self.stop_ids = stop_ids_for(self.eos_id, self.token_to_id)

  @classmethod
  def from_directory(cls, directory: str | os.PathLike):
    """Loads `tokenizer.model` and, if present, `tokenizer_config.json`."""
    directory = pathlib.Path(directory)
    config = read_json(directory / CONFIG_FILE) if (
        directory / CONFIG_FILE).exists() else {}
    return cls((directory / SPM_FILE).read_bytes(),
               chat_template=find_chat_template(directory, config),
               special_tokens=config.get("special_tokens",
                                         DEFAULT_SPECIAL_SYMBOLS))

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    return self._bos_prefix(add_bos) + self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str],
                   add_bos: bool = False) -> list[list[int]]:
    prefix = self._bos_prefix(add_bos)
    return [prefix + ids for ids in self._sp.encode(list(texts))]

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    # sp.decode renders control pieces as "", so runs of ordinary ids are
    # decoded together and special ids are dropped or written as text.
    parts, run = [], []
    for i in map(int, ids):
      if not 0 <= i < self.vocab_size:
        continue
      if i in self._special_ids:
        parts.append(self._sp.decode(run))
        run = []
        if not skip_special:
          parts.append(self._sp.id_to_piece(i))
      else:
        run.append(i)
    parts.append(self._sp.decode(run))
    return "".join(parts)

  def token_to_id(self, token: str) -> int | None:
    i = self._sp.piece_to_id(token)
    # piece_to_id returns unk for unknown pieces.
    return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(
        i) else i

  def id_to_token(self, token_id: int) -> str | None:
    if not 0 <= token_id < self.vocab_size:
      return None
    return self._sp.id_to_piece(token_id)

  @property
  def special_tokens_map(self) -> dict[str, str]:
    sp = self._sp
    named = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(),
             "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
    return {k: sp.id_to_piece(i) for k, i in named.items() if i >= 0}

  def save(self, directory: str | os.PathLike) -> None:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPM_FILE).write_bytes(self._proto)
    config = {"tokenizer_class": "SentencePiece (brorl_jax)",
              **self.special_tokens_map,
              "special_tokens": list(self.special_tokens),
              "chat_template": self.chat_template}
    write_json(directory / CONFIG_FILE, config)


def train_sentencepiece(
    lines: Iterable[str],
    vocab_size: int,
    directory: str | os.PathLike | None = None,
    *,
    user_defined_symbols: Sequence[str] = DEFAULT_USER_SYMBOLS,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_SYMBOLS,
    chat_template: str | None = None,
    **trainer_kwargs: Any,
) -> SentencePieceTokenizer:
  """Trains a byte-fallback BPE SentencePiece model in memory (CPU demo).

  Text round-trips exactly: no normalization, no whitespace collapsing, no
  dummy prefix, and bytes for characters outside the vocabulary. Ids: pad 0,
  unk 1, bos 2, eos 3, then `user_defined_symbols` in order.

  Args:
    lines: training text, one example per item.
    vocab_size: requested size; it must exceed 256 bytes + the distinct
      characters + the symbols. A small corpus may give fewer pieces
      (`hard_vocab_limit=False`): read the result's `vocab_size`.
    directory: if given, the tokenizer is saved there (`tokenizer.model` and
      `tokenizer_config.json` holding the chat template).
    user_defined_symbols: pieces always kept whole (e.g. `"<think>"`).
    special_tokens: which of them `decode` drops as special.
    chat_template: jinja source; None gives `templates.DEFAULT_CHAT_TEMPLATE`.
    **trainer_kwargs: overrides for `spm.SentencePieceTrainer.train`.

  Returns:
    The trained tokenizer.
  """
  options = {
      "model_type": "bpe", "vocab_size": vocab_size,
      "hard_vocab_limit": False, "character_coverage": 1.0,
      "byte_fallback": True, "split_digits": True,
      # Exact round trips: no normalization, whitespace kept as written.
      "normalization_rule_name": "identity",
      "remove_extra_whitespaces": False, "add_dummy_prefix": False,
      "allow_whitespace_only_pieces": True,
      "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
      "user_defined_symbols": list(user_defined_symbols),
      "minloglevel": 2, "num_threads": 1}
  options.update(trainer_kwargs)
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)), model_writer=buf, **options)
  except RuntimeError as e:
    raise TokenizerError(f"SentencePiece training failed: {e}") from e
  tok = SentencePieceTokenizer(buf.getvalue(), chat_template=chat_template,
                               special_tokens=special_tokens)
  if directory is not None:
    tok.save(directory)
  return tok


def find_chat_template(directory: pathlib.Path,
                       config: Mapping[str, Any]) -> str | None:
  """The chat template: `chat_template.jinja`, else the config's entry."""
  jinja_file = directory / "chat_template.jinja"
  if jinja_file.exists():
    return jinja_file.read_text(encoding="utf-8")
  template = config.get("chat_template")
  if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
    named = {t["name"]: t["template"] for t in template}
    if "default" not in named:
      raise TokenizerError(
          f"{directory / CONFIG_FILE}: chat_template lists {sorted(named)} "
          "but no 'default'")
    template = named["default"]
  return template


def read_json(path: pathlib.Path) -> dict[str, Any]:
  """Reads a JSON file; a clear TokenizerError when it is unreadable."""
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise TokenizerError(f"cannot read {path}: {e}") from e


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Writes UTF-8 JSON, indented, keeping non-ASCII characters."""
  path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n",
                  encoding="utf-8")
