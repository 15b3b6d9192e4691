"""Hugging Face tokenizers through the `tokenizers` package (no transformers).

Two ways in:

* a folder with `tokenizer.json` (what HF model repos ship);
* a folder with `vocab.json` + `merges.txt` + `tokenizer_config.json`: the
  Qwen2 byte-level BPE is built here (`build_qwen2_bpe`) with the pipeline
  transformers' `Qwen2Tokenizer` uses, plus the added tokens of the config's
  `added_tokens_decoder`.

DeepSeek-R1-Distill-Qwen ships only `tokenizer.json`; its BPE is Qwen2.5's
with renamed added tokens, and its `tokenizer_config.json` lists none of them.
A folder holding Qwen2's `vocab.json` + `merges.txt` and the distill's
`tokenizer_config.json` therefore loads with the added tokens of
`R1_DISTILL_QWEN_ADDED_TOKENS` (chosen because that config's eos is
`<｜end▁of▁sentence｜>`). `save()` writes a complete `tokenizer.json`, so
the saved folder needs nothing else (and transformers loads it).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from brorl_jax.data import templates
from brorl_jax.data import tokenizer as tokenizer_lib

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer, tiktoken's cl100k
# pattern with single digits); see tests/fixtures/qwen2_tokenizer/README.md.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# id -> (content, special) of DeepSeek-R1-Distill-Qwen's tokenizer.json
# (tests/fixtures/r1_distill_qwen_tokenizer/README.md). ids 151644/151645 are
# <｜User｜>/<｜Assistant｜> here, not ChatML's <|im_start|>/<|im_end|>.
R1_DISTILL_QWEN_ADDED_TOKENS = {
    151643: ("<｜end▁of▁sentence｜>", True),
    151644: ("<｜User｜>", False),
    151645: ("<｜Assistant｜>", False),
    151646: ("<｜begin▁of▁sentence｜>", True),
    151647: ("<|EOT|>", False),
    151648: ("<think>", False),
    151649: ("</think>", False),
    151650: ("<|quad_start|>", True),
    151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True),
    151653: ("<|vision_end|>", True),
    151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True),
    151656: ("<|video_pad|>", True),
    151657: ("<tool_call>", False),
    151658: ("</tool_call>", False),
    151659: ("<|fim_prefix|>", False),
    151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False),
    151662: ("<|fim_pad|>", False),
    151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False),
}
# Configs without added tokens, recognised by their eos string.
KNOWN_ADDED_TOKENS = {"<｜end▁of▁sentence｜>": R1_DISTILL_QWEN_ADDED_TOKENS}

_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
          "cls_token", "mask_token")
_TokenizerError = tokenizer_lib.TokenizerError


def build_qwen2_bpe(
    vocab_file: str | os.PathLike, merges_file: str | os.PathLike,
    added_tokens: Mapping[int, tuple[str, bool] | Mapping[str, Any]],
) -> tokenizers.Tokenizer:
  """Builds Qwen2's byte-level BPE from `vocab.json` + `merges.txt`.

  Pipeline: NFC normalizer; pre-tokenizer Split(QWEN2_PATTERN, isolated) then
  ByteLevel without prefix space or regex; BPE; ByteLevel decoder.

  Args:
    vocab_file: path of vocab.json.
    merges_file: path of merges.txt.
    added_tokens: id -> (content, special), or id -> an `added_tokens_decoder`
      entry (`content`, `special`, `lstrip`, `rstrip`, `normalized`,
      `single_word`). Ids must follow the BPE vocabulary without gaps.

  Returns:
    The tokenizer.

  Raises:
    TokenizerError: an added token does not get its stated id.
  """
  tok = tokenizers.Tokenizer(
      models.BPE.from_file(str(vocab_file), str(merges_file)))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN2_PATTERN),
                           behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  for token_id in sorted(added_tokens):
    entry = added_tokens[token_id]
    if not isinstance(entry, Mapping):
      entry = {"content": entry[0], "special": entry[1]}
    token = tokenizers.AddedToken(
        entry["content"], special=bool(entry.get("special", False)),
        normalized=bool(entry.get("normalized", False)),
        lstrip=bool(entry.get("lstrip", False)),
        rstrip=bool(entry.get("rstrip", False)),
        single_word=bool(entry.get("single_word", False)))
    if token.special:
      tok.add_special_tokens([token])
    else:
      tok.add_tokens([token])
    if tok.token_to_id(entry["content"]) != int(token_id):
      raise _TokenizerError(
          f"added token {entry['content']!r} got id "
          f"{tok.token_to_id(entry['content'])}, expected {token_id}: the "
          "added ids must continue the BPE vocabulary without gaps")
  return tok


class HFTokenizer(tokenizer_lib.Tokenizer):
  """A `tokenizers.Tokenizer` plus the settings of `tokenizer_config.json`."""

  def __init__(self, tok: tokenizers.Tokenizer, config: Mapping[str, Any], *,
               chat_template: str | None = None,
               extra_stop_ids: Sequence[int] = ()):
    """Wraps a tokenizer.

    Args:
      tok: the tokenizer (its post-processor is never applied: encode adds
        bos only when asked).
      config: the `tokenizer_config.json` contents; `bos_token`,
        `eos_token`, `pad_token` (strings or `{"content": ...}` dicts) are
        read; everything is written back by `save`.
      chat_template: jinja source; None takes the config's, else the
        built-in default.
      extra_stop_ids: more stop ids (e.g. generation_config's eos ids).
    """
    self._tok = tok
    self.config = dict(config)
    self._named = {}
    for name in _NAMED:
      value = self.config.get(name)
      if isinstance(value, Mapping):
        value = value.get("content")
      if value is not None:
        self._named[name] = str(value)
    added = tok.get_added_tokens_decoder()
    self.vocab_size = max([tok.get_vocab_size(with_added_tokens=True)]
                          + [i + 1 for i in added])
    self.eos_id = self._named_id("eos_token", required=True)
    self.bos_id = self._named_id("bos_token")
    pad_id = self._named_id("pad_token")
    self.pad_id = self.eos_id if pad_id is None else pad_id
    self.chat_template = (chat_template or self.config.get("chat_template")
                          or templates.DEFAULT_CHAT_TEMPLATE)
    self.stop_ids = tokenizer_lib.stop_ids_for(
        self.eos_id, self.token_to_id, extra_stop_ids)

  def _named_id(self, name: str, required: bool = False) -> int | None:
    token = self._named.get(name)
    if token is None:
      if required:
        raise _TokenizerError(
            f"tokenizer_config.json names no {name}; add one")
      return None
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise _TokenizerError(
          f"tokenizer_config.json {name} {token!r} is not in the vocabulary")
    return token_id

  @classmethod
  def from_directory(cls, directory: str | os.PathLike) -> HFTokenizer:
    """Loads `tokenizer.json` + `tokenizer_config.json` (+ chat template)."""
    directory = pathlib.Path(directory)
    try:
      tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as e:  # tokenizers raises its own Exception type
      raise _TokenizerError(
          f"cannot read {directory / 'tokenizer.json'}: {e}") from e
    return cls._with_config(tok, directory)

  @classmethod
  def from_vocab_merges(cls, directory: str | os.PathLike) -> HFTokenizer:
    """Builds the Qwen2 BPE from `vocab.json` + `merges.txt` + config."""
    directory = pathlib.Path(directory)
    config = _config(directory)
    added = config.get("added_tokens_decoder")
    if not added:
      eos = config.get("eos_token")
      eos = eos.get("content") if isinstance(eos, Mapping) else eos
      added = KNOWN_ADDED_TOKENS.get(eos)
      if added is None:
        raise _TokenizerError(
            f"{directory / tokenizer_lib.CONFIG_FILE} has no "
            "added_tokens_decoder and its eos token "
            f"{eos!r} is not a known family: add the added tokens "
            "(id -> {content, special}) to the config, or use tokenizer.json")
    added = {int(k): v for k, v in added.items()}
    tok = build_qwen2_bpe(directory / "vocab.json", directory / "merges.txt",
                          added)
    return cls._with_config(tok, directory)

  @classmethod
  def _with_config(cls, tok, directory: pathlib.Path) -> HFTokenizer:
    config = _config(directory)
    extra = []
    gen_file = directory / "generation_config.json"
    if gen_file.exists():
      eos = tokenizer_lib.read_json(gen_file).get("eos_token_id")
      extra = [eos] if isinstance(eos, int) else list(eos or [])
    return cls(tok, config,
               chat_template=tokenizer_lib.find_chat_template(directory,
                                                              config),
               extra_stop_ids=extra)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return self._bos_prefix(add_bos) + ids

  def encode_batch(self, texts: Sequence[str],
                   add_bos: bool = False) -> list[list[int]]:
    prefix = self._bos_prefix(add_bos)
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [prefix + e.ids for e in encodings]

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    ids = [i for i in map(int, ids) if 0 <= i < self.vocab_size]
    return self._tok.decode(ids, skip_special_tokens=skip_special)

  def decode_batch(self, batch: Iterable[Iterable[int]],
                   skip_special: bool = True) -> list[str]:
    batch = [[i for i in map(int, ids) if 0 <= i < self.vocab_size]
             for ids in batch]
    return self._tok.decode_batch(batch, skip_special_tokens=skip_special)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self._tok.id_to_token(token_id)

  @property
  def special_tokens_map(self) -> dict[str, str]:
    return dict(self._named)

  def save(self, directory: str | os.PathLike) -> None:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self._tok.save(str(directory / "tokenizer.json"), pretty=False)
    config = dict(self.config)
    config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip,
                 "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(self._tok.get_added_tokens_decoder().items())}
    config["chat_template"] = self.chat_template
    tokenizer_lib.write_json(directory / tokenizer_lib.CONFIG_FILE, config)


def _config(directory: pathlib.Path) -> dict[str, Any]:
  path = directory / tokenizer_lib.CONFIG_FILE
  return tokenizer_lib.read_json(path) if path.exists() else {}
