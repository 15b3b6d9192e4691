"""Tokenizer fixtures for the data tests, built once per session.

The real Qwen2 BPE takes about 0.3 s to build; the R1-Distill folder is
assembled in a temporary directory from Qwen2's vocab.json + merges.txt and
the distill's tokenizer_config.json (its README explains why).
"""

import pathlib
import random
import shutil

import pytest

from brorl_jax.data import tokenizer as tokenizer_lib
from brorl_jax.data import tokenizer_loader

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
QWEN2_DIR = FIXTURES / "qwen2_tokenizer"
R1_CONFIG = FIXTURES / "r1_distill_qwen_tokenizer" / "tokenizer_config.json"


@pytest.fixture(scope="session")
def qwen2_tokenizer():
  return tokenizer_loader.load_tokenizer(QWEN2_DIR)


@pytest.fixture(scope="session")
def r1_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("r1_distill_tokenizer")
  for name in ("vocab.json", "merges.txt"):
    (directory / name).symlink_to(QWEN2_DIR / name)
  shutil.copy(R1_CONFIG, directory / "tokenizer_config.json")
  return directory


@pytest.fixture(scope="session")
def r1_tokenizer(r1_dir):
  return tokenizer_loader.load_tokenizer(r1_dir)


def _demo_lines(n=400, seed=0):
  """Short arithmetic-flavoured text with chat markers, for SentencePiece."""
  rng = random.Random(seed)
  lines = []
  for _ in range(n):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    lines.append(f"<|im_start|>user\nWhat is {a} + {b}?<|im_end|>\n"
                 f"<|im_start|>assistant\n{a} + {b} = {a + b}. "
                 f"\\boxed{{{a + b}}}<|im_end|>")
  return lines


@pytest.fixture(scope="session")
def demo_lines():
  """The function `(n=400, seed=0) -> lines` of demo training text."""
  return _demo_lines


@pytest.fixture(scope="session")
def spm_tokenizer():
  return tokenizer_lib.train_sentencepiece(_demo_lines(), vocab_size=320)
