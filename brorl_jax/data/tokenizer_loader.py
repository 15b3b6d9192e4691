"""`load_tokenizer`: a tokenizer folder -> the right `Tokenizer`.

It sits above both kinds (`tokenizer.py`'s SentencePiece, `hf_tokenizer.py`'s
HF tokenizers), which import only the interface, so the factory closes no
import circle.
"""

from __future__ import annotations

import os
import pathlib

from brorl_jax.data import hf_tokenizer
from brorl_jax.data import tokenizer as tokenizer_lib


def load_tokenizer(path: str | os.PathLike) -> tokenizer_lib.Tokenizer:
  """Loads a tokenizer folder (or a `tokenizer.model`/`tokenizer.json` file).

  Args:
    path: a folder holding `tokenizer.json`, `tokenizer.model`, or
      `vocab.json` + `merges.txt` (each with an optional
      `tokenizer_config.json`), or the path of one of the first two files.

  Returns:
    The tokenizer.

  Raises:
    TokenizerError: no known tokenizer files, or they are inconsistent.
  """
  path = pathlib.Path(path)
  if path.is_file() and path.name in ("tokenizer.json", tokenizer_lib.SPM_FILE):
    path = path.parent
  if not path.is_dir():
    raise tokenizer_lib.TokenizerError(
        f"tokenizer folder {path} does not exist")
  if (path / "tokenizer.json").exists():
    return hf_tokenizer.HFTokenizer.from_directory(path)
  if (path / tokenizer_lib.SPM_FILE).exists():
    return tokenizer_lib.SentencePieceTokenizer.from_directory(path)
  if (path / "vocab.json").exists() and (path / "merges.txt").exists():
    return hf_tokenizer.HFTokenizer.from_vocab_merges(path)
  found = sorted(p.name for p in path.iterdir())
  raise tokenizer_lib.TokenizerError(
      f"no tokenizer in {path}: expected tokenizer.json, tokenizer.model, or "
      f"vocab.json + merges.txt; found {found}")
