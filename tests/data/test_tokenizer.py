"""Tokenizers against the real Qwen2 / R1-Distill files and transformers."""

import json
import pathlib
import shutil
import unicodedata

import numpy as np
import pytest

from brorl_jax.data import hf_tokenizer
from brorl_jax.data import templates
from brorl_jax.data import tokenizer as tokenizer_lib
from brorl_jax.data import tokenizer_loader

QWEN2_DIR = (pathlib.Path(__file__).resolve().parents[1] / "fixtures"
             / "qwen2_tokenizer")

# Golden ids from tests/fixtures/qwen2_tokenizer/README.md (checks 6, 7, 13).
GOLDEN = [
    ("Hello world", [9707, 1879]),
    ("The capital of France is", [785, 6722, 315, 9625, 374]),
    ("hello   world  ", [14990, 256, 1879, 256]),
    ("I'm here, you're there. Don't stop!",
     [40, 2776, 1588, 11, 498, 2299, 1052, 13, 4320, 944, 2936, 0]),
    ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
     [151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645, 198, 151644,
      77091, 198]),
    ("नमस्ते दुनिया — こんにちは世界 — 🚀🔥",
     [60096, 87244, 78368, 30484, 97, 34370, 14925, 99, 72653, 60096, 42311,
      107, 23868, 1959, 220, 89015, 99489, 1959, 11162, 248, 222, 144670]),
    ("def f(x):\n    return x * 2\n\n\n",
     [750, 282, 2075, 982, 262, 470, 856, 353, 220, 17, 1406]),
    ("", []),
]
QWEN_CHAT_IDS = [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553,
                 54364, 14817, 13, 1446, 525, 264, 10950, 17847, 13, 151645,
                 198, 151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]
HARD = [
    "naïve café — “quotes” …", "中文测试：你好，世界！", "한국어 텍스트",
    "Emoji 🤖👍🏽👨‍👩‍👧 flags 🇫🇷", "math ∑∫√∞ ≠ ≤ ∀x∈ℝ",
    "tabs\tand\nnewlines\r\n\n", "zero\u200bwidth\u00a0nbsp",
    "\x00\x01\x7f control", "e\u0301 decomposed Å",  # not NFC
]
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello"}],
    "system": [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Hi"}],
    "multi": [{"role": "system", "content": "S"},
              {"role": "user", "content": "Q"},
              {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA"},
              {"role": "user", "content": "Q2"}],
}


@pytest.fixture(scope="module")
def hf_qwen2():
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(QWEN2_DIR)


@pytest.fixture(scope="module")
def hf_r1(r1_tokenizer, tmp_path_factory):
  """transformers' tokenizer for our saved R1 folder (a full tokenizer.json)."""
  transformers = pytest.importorskip("transformers")
  directory = tmp_path_factory.mktemp("r1_saved")
  r1_tokenizer.save(directory)
  return transformers.AutoTokenizer.from_pretrained(directory)


def test_qwen2_special_ids(qwen2_tokenizer):
  tok = qwen2_tokenizer
  assert isinstance(tok, hf_tokenizer.HFTokenizer)
  assert tok.vocab_size == 151665
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 151645, 151643)
  assert tok.stop_ids == (151645, 151643)
  assert tok.token_to_id("<|im_start|>") == 151644
  assert tok.id_to_token(9707) == "Hello"


@pytest.mark.parametrize("text,ids", GOLDEN)
def test_qwen2_golden_ids(qwen2_tokenizer, text, ids):
  assert qwen2_tokenizer.encode(text) == ids


def test_encode_batch_matches_encode(qwen2_tokenizer):
  texts = [t for t, _ in GOLDEN]
  assert qwen2_tokenizer.encode_batch(texts) == [ids for _, ids in GOLDEN]


def test_decode_roundtrip_is_nfc(qwen2_tokenizer, spm_tokenizer):
  for tok in (qwen2_tokenizer, spm_tokenizer):
    decoded = tok.decode_batch(tok.encode_batch(HARD))
    expected = HARD if tok is spm_tokenizer else [
        unicodedata.normalize("NFC", t) for t in HARD]
    assert decoded == expected


def test_decode_skips_special_and_out_of_range(qwen2_tokenizer):
  tok = qwen2_tokenizer
  ids = [151644, 9707, 151645, 1879, 151643, 151900, -1]
  assert tok.decode(ids) == "Hello world"
  assert tok.decode(ids, skip_special=False) == (
      "<|im_start|>Hello<|im_end|> world<|endoftext|>")
  assert tok.decode(np.array([9707, 1879], np.int32)) == "Hello world"
  # Non-special added tokens (<tool_call>) survive skip_special, as in HF.
  assert tok.decode([151657, 9707]) == "<tool_call>Hello"


def test_ids_match_transformers(qwen2_tokenizer, hf_qwen2):
  texts = [t for t, _ in GOLDEN] + HARD + [
      "<tool_call> <|fim_prefix|> literal specials <|im_end|>"]
  for text in texts:
    assert qwen2_tokenizer.encode(text) == hf_qwen2.encode(
        text, add_special_tokens=False), text
  ids = qwen2_tokenizer.encode(" ".join(texts))
  assert qwen2_tokenizer.decode(ids) == hf_qwen2.decode(
      ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_qwen2_chat_template_matches_transformers(
    qwen2_tokenizer, hf_qwen2, name, generation_prompt):
  messages = CONVERSATIONS[name]
  ours = qwen2_tokenizer.apply_chat_template(
      messages, add_generation_prompt=generation_prompt)
  assert ours == hf_qwen2.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_qwen2_chat_template_golden(qwen2_tokenizer):
  text = qwen2_tokenizer.apply_chat_template(CONVERSATIONS["user"])
  assert text == (
      "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
      "helpful assistant.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
      "<|im_start|>assistant\n")
  assert qwen2_tokenizer.encode(text) == QWEN_CHAT_IDS


def test_r1_distill_tokenizer(r1_tokenizer):
  tok = r1_tokenizer
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (151646, 151643, 151643)
  assert tok.stop_ids == (151643,)
  assert tok.token_to_id("</think>") == 151649
  assert tok.encode(
      "<｜begin▁of▁sentence｜><｜User｜>Hello, world!<｜Assistant｜>") == [
          151646, 151644, 9707, 11, 1879, 0, 151645]
  # README check 15.
  text = tok.apply_chat_template([{"role": "user", "content": "Hello, world!"}])
  assert text == ("<｜begin▁of▁sentence｜><｜User｜>Hello, world!"
                  "<｜Assistant｜><think>\n")
  assert tok.encode(text) == [151646, 151644, 9707, 11, 1879, 0, 151645,
                              151648, 198]
  assert tok.encode("hi", add_bos=True) == [151646, 6023]
  # README check 16: system right after bos, earlier reasoning cut.
  assert tok.apply_chat_template(CONVERSATIONS["multi"]) == (
      "<｜begin▁of▁sentence｜>S<｜User｜>Q<｜Assistant｜>\n\nA"
      "<｜end▁of▁sentence｜><｜User｜>Q2<｜Assistant｜><think>\n")
  # bos/eos are special; <think> is not (it stays in decoded reasoning).
  assert tok.decode(tok.encode(text)) == (
      "<｜User｜>Hello, world!<｜Assistant｜><think>\n")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_r1_matches_transformers(r1_tokenizer, hf_r1, name):
  messages = CONVERSATIONS[name]
  ours = r1_tokenizer.apply_chat_template(messages)
  assert ours == hf_r1.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=True)
  assert r1_tokenizer.encode(ours) == hf_r1.encode(ours,
                                                   add_special_tokens=False)
  assert (hf_r1.bos_token_id, hf_r1.eos_token_id) == (151646, 151643)


def test_hf_save_and_reload(qwen2_tokenizer, hf_qwen2, tmp_path):
  qwen2_tokenizer.save(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "tokenizer.json", "tokenizer_config.json"]
  again = tokenizer_loader.load_tokenizer(tmp_path)
  texts = [t for t, _ in GOLDEN] + HARD
  assert again.encode_batch(texts) == qwen2_tokenizer.encode_batch(texts)
  assert again.chat_template == qwen2_tokenizer.chat_template
  assert (again.vocab_size, again.eos_id, again.pad_id, again.stop_ids) == (
      151665, 151645, 151643, (151645, 151643))
  # transformers reads the saved folder the same way.
  transformers = pytest.importorskip("transformers")
  reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for text in texts:
    assert reloaded.encode(text, add_special_tokens=False) == (
        hf_qwen2.encode(text, add_special_tokens=False))


def test_generation_config_adds_stop_ids(tmp_path):
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    (tmp_path / name).symlink_to(QWEN2_DIR / name)
  (tmp_path / "generation_config.json").write_text(
      json.dumps({"eos_token_id": [151645, 151643, 151657]}))
  tok = tokenizer_loader.load_tokenizer(tmp_path)
  assert tok.stop_ids == (151645, 151643, 151657)


def test_sentencepiece_roundtrip_and_save(spm_tokenizer, demo_lines,
                                         tmp_path):
  tok = spm_tokenizer
  assert isinstance(tok, tokenizer_lib.SentencePieceTokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert tok.stop_ids == (3, tok.token_to_id("<|im_end|>"))
  assert tok.vocab_size == 320
  for text in ["What is 12 + 7?", "  two  spaces\n\nand tabs\t",
               "héllo 🤖 中文 ∑", "<think>\nx</think>"]:
    ids = tok.encode(text)
    assert max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
  # A chat marker is one piece, special, and dropped by decode.
  marker = tok.token_to_id("<|im_start|>")
  assert tok.encode("<|im_start|>user")[0] == marker
  assert tok.decode([marker, *tok.encode("hi"), tok.eos_id]) == "hi"
  assert tok.decode([marker, *tok.encode("hi"), tok.eos_id],
                    skip_special=False) == "<|im_start|>hi</s>"
  assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
  text = tok.apply_chat_template([{"role": "user", "content": "What is 1+2?"}])
  assert text == ("<|im_start|>user\nWhat is 1+2?<|im_end|>\n"
                  "<|im_start|>assistant\n")
  # save / load keeps pieces, specials and the template.
  custom = "{% for m in messages %}Q: {{ m.content }}\n{% endfor %}A:"
  tok2 = tokenizer_lib.train_sentencepiece(
      demo_lines(200), 300, tmp_path / "spm", chat_template=custom)
  again = tokenizer_loader.load_tokenizer(tmp_path / "spm")
  assert isinstance(again, tokenizer_lib.SentencePieceTokenizer)
  assert again.chat_template == custom
  assert again.apply_chat_template([{"role": "user", "content": "x"}]) == (
      "Q: x\nA:")
  assert again.encode_batch(HARD) == tok2.encode_batch(HARD)
  assert (again.stop_ids, again.special_tokens) == (tok2.stop_ids,
                                                    tok2.special_tokens)


def test_sentencepiece_vocab_too_small(demo_lines):
  with pytest.raises(tokenizer_lib.TokenizerError, match="training failed"):
    tokenizer_lib.train_sentencepiece(demo_lines(50), 100)


def test_load_errors(tmp_path):
  with pytest.raises(tokenizer_lib.TokenizerError, match="does not exist"):
    tokenizer_loader.load_tokenizer(tmp_path / "missing")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(tokenizer_lib.TokenizerError, match="no tokenizer in"):
    tokenizer_loader.load_tokenizer(tmp_path)
  # vocab + merges whose config has no added tokens and an unknown eos.
  for name in ("vocab.json", "merges.txt"):
    (tmp_path / name).symlink_to(QWEN2_DIR / name)
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"eos_token": "<eos>"}))
  with pytest.raises(tokenizer_lib.TokenizerError,
                     match="no added_tokens_decoder"):
    tokenizer_loader.load_tokenizer(tmp_path)


def test_bos_required_for_add_bos(qwen2_tokenizer):
  with pytest.raises(tokenizer_lib.TokenizerError, match="no bos token"):
    qwen2_tokenizer.encode("x", add_bos=True)


def test_template_features_match_transformers(hf_qwen2):
  # namespace, loop controls, tojson without HTML escaping, None-dropping,
  # raise_exception and the generation tag.
  source = (
      "{% set ns = namespace(n=0) %}{% for m in messages %}"
      "{% if m.role == 'skip' %}{% continue %}{% endif %}"
      "{% set ns.n = ns.n + 1 %}{{ m | tojson }}|{{ m.extra is defined }}\n"
      "{% endfor %}{% generation %}{{ ns.n }}{{ bos_token }}{% endgeneration %}"
      "{% if add_generation_prompt %}{{ eos_token }}{% endif %}")
  messages = [{"role": "user", "content": "<a & b>", "extra": None},
              {"role": "skip", "content": "x"}]
  ours = templates.render_chat_template(
      source, messages, special_tokens={"eos_token": "<|im_end|>"})
  theirs = hf_qwen2.apply_chat_template(messages, chat_template=source,
                                        tokenize=False,
                                        add_generation_prompt=True)
  assert ours == theirs == (
      '{"role": "user", "content": "<a & b>"}|False\n1<|im_end|>')
  with pytest.raises(templates.ChatTemplateError, match="boom"):
    templates.render_chat_template("{{ raise_exception('boom') }}", messages)
  with pytest.raises(templates.ChatTemplateError, match="does not compile"):
    templates.render_chat_template("{% for %}", messages)


def test_chat_template_jinja_file_wins(tmp_path):
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    shutil.copy(QWEN2_DIR / name, tmp_path / name)
  (tmp_path / "chat_template.jinja").write_text(
      "{% for m in messages %}[{{ m.content }}]{% endfor %}")
  tok = tokenizer_loader.load_tokenizer(tmp_path)
  assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"
