"""Hugging Face `datasets` sources and the column mapping (data.*_key).

Saved datasets are built here with `datasets` itself; the `hf:` name path
is tested offline: a dataset that is not cached gives the error with the
fix, and one in a cache built here (the layout a download leaves) loads.
"""

import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from brorl_jax import config as config_lib
from brorl_jax.data import columns as columns_lib
from brorl_jax.data import hf_datasets, prompts, records

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROWS = {"question": ["1+1?", "2+3?", "7*6?"], "solution": [2, 5, 42],
        "level": [1, 1, 2]}


def _spec(path, **keys):
  cfg = config_lib.from_mapping(prompts.DataConfig, {
      "train_files": [str(path)], **keys}, "data")
  return cfg.train_files[0]


MAPPED = dict(prompt_key="question", answer_key="solution",
              default_verifier="numeric")


def test_saved_dataset_with_column_mapping(tmp_path):
  path = tmp_path / "arith"
  datasets.Dataset.from_dict(ROWS).save_to_disk(str(path))
  assert hf_datasets.is_source(str(path))
  result = records.read_records(_spec(path, **MAPPED))
  assert [r.prompt for r in result.records] == ROWS["question"]
  assert [r.answer for r in result.records] == ["2", "5", "42"]
  assert {r.verifier for r in result.records} == {"numeric"}
  assert {r.task for r in result.records} == {"arith"}  # the directory
  assert result.records[2].meta == {"level": 2}
  # Without the mapping the rows have no prompt: the first is named.
  with pytest.raises(records.DataError, match=r"arith:1: field 'prompt'"):
    records.read_records(_spec(path, default_verifier="numeric"))


def test_dataset_dict_needs_its_split(tmp_path):
  path = tmp_path / "dd"
  datasets.DatasetDict({
      "train": datasets.Dataset.from_dict(ROWS),
      "test": datasets.Dataset.from_dict({k: v[:1] for k, v in ROWS.items()}),
  }).save_to_disk(str(path))
  result = records.read_records(_spec(f"{path}:test", **MAPPED))
  assert len(result.records) == 1 and result.task == "dd"
  assert result.path == f"{path}:test"
  for entry, message in [(str(path), "splits test, train: name one"),
                         (f"{path}:dev", "no split 'dev'")]:
    with pytest.raises(records.DataError, match=message):
      records.read_records(_spec(entry, **MAPPED))


def test_bad_rows_are_named_or_skipped_and_counted(tmp_path):
  path = tmp_path / "bad"
  datasets.Dataset.from_dict({
      "question": ["1+1?", None, "3+3?", ""],
      "solution": ["2", "4", None, "1"]}).save_to_disk(str(path))
  with pytest.raises(records.DataError,
                     match=r"bad:2: field 'question': missing"):
    records.read_records(_spec(path, **MAPPED))
  result = records.read_records(_spec(path, **MAPPED), skip_bad_rows=True)
  assert (result.rows, result.bad_rows, len(result.records)) == (4, 3, 1)
  assert "bad:3: field 'solution': missing" in result.errors[1]
  assert "bad:4: field 'prompt': is empty" in result.errors[2]


def test_other_directories_and_missing_package(tmp_path, monkeypatch):
  (tmp_path / "plain").mkdir()
  with pytest.raises(records.DataError, match="not one written by"):
    records.read_records(tmp_path / "plain")
  with pytest.raises(records.DataError, match="file not found"):
    records.read_records(tmp_path / "nothing.jsonl")
  monkeypatch.setitem(sys.modules, "datasets", None)   # not installed
  with pytest.raises(records.DataError, match=r"brorl-jax\[datasets\]"):
    records.read_records("hf:openai/gsm8k:main@test")


def test_hub_name_parsing_and_unreachable_hub(monkeypatch):
  assert hf_datasets.parse_hub_name("hf:openai/gsm8k:main@test") == (
      "openai/gsm8k", "main", "test")
  assert hf_datasets.parse_hub_name("hf:HuggingFaceH4/MATH-500@test") == (
      "HuggingFaceH4/MATH-500", None, "test")
  assert hf_datasets.default_task("hf:openai/gsm8k:main@test") == "gsm8k"
  with pytest.raises(records.DataError, match=r"hf:NAME\[:CONFIG\]@SPLIT"):
    records.read_records("hf:openai/gsm8k")

  calls = []

  def unreachable(name, config, split):
    calls.append((name, config, split))
    # What datasets raises when the Hub refuses connections.
    raise ConnectionError(f"Couldn't reach '{name}' on the Hub "
                          "(LocalEntryNotFoundError)")

  monkeypatch.setattr(datasets, "load_dataset", unreachable)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
  with pytest.raises(records.DataError) as e:
    records.read_records("hf:openai/gsm8k:main@test")
  assert calls == [("openai/gsm8k", "main", "test")]
  text = str(e.value)
  assert text.startswith("hf:openai/gsm8k:main@test: cannot load")
  assert "Couldn't reach" in text and "HF_HUB_OFFLINE=1" in text
  assert "\n" not in text


_OFFLINE = textwrap.dedent("""\
    import json, sys
    from brorl_jax.data import records
    for entry in sys.argv[1:]:
      try:
        result = records.read_records(records.FileSpec(
            entry, verifier="numeric", columns=records.Columns(
                "question", "solution")))
        print(json.dumps([[r.prompt, r.answer, r.task] for r in
                          result.records]))
      except records.DataError as e:
        print("DataError:", e)
    """)


def _build_cache(cache, tmp_path):
  """The cache a download of `local/tiny` (split test) leaves behind."""
  # pylint: disable-next=import-outside-toplevel
  from datasets.packaged_modules.json.json import Json
  data = tmp_path / "test.jsonl"
  data.write_text("".join(json.dumps({"question": q, "solution": s}) + "\n"
                          for q, s in zip(ROWS["question"], ROWS["solution"])))
  builder = Json(cache_dir=str(cache), dataset_name="tiny", hash="0123abcd",
                 data_files={"test": str(data)})
  builder.download_and_prepare()
  # Hub datasets live under NAMESPACE___NAME/CONFIG/VERSION/HASH.
  (cache / "local___tiny").mkdir()
  shutil.move(glob.glob(str(cache / "tiny" / "default-*"))[0],
              cache / "local___tiny" / "default")


def test_hub_name_offline_uses_the_cache_or_says_how(tmp_path):
  cache = tmp_path / "cache"
  _build_cache(cache, tmp_path)
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(cache),
             PYTHONPATH=str(ROOT))

  out = subprocess.run([sys.executable, "-c", _OFFLINE, "hf:local/tiny@test",
                        "hf:local/absent@test"], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  cached, missing = out.stdout.strip().splitlines()[-2:]
  assert json.loads(cached) == [
      [q, str(s), "tiny"] for q, s in zip(ROWS["question"], ROWS["solution"])]
  assert missing.startswith("DataError: hf:local/absent@test: cannot load")
  assert "OfflineModeIsEnabled" in missing
  assert "reads only the cache" in missing


# ---- the column mapping on every kind of file -------------------------------


def test_mapping_on_jsonl_with_nested_answer_and_messages(tmp_path):
  path = tmp_path / "verl.jsonl"
  rows = [{"prompt": [{"role": "user", "content": "1+1?"}],
           "reward_model": {"ground_truth": "2", "style": "rule"},
           "answer": "not this", "ability": "math"},
          {"prompt": "2+2?", "reward_model": {"ground_truth": 4},
           "source": "math"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  result = records.read_records(_spec(
      path, prompt_key="prompt", answer_key="reward_model.ground_truth",
      verifier_key="ability", default_verifier="numeric"))
  first, second = result.records
  assert first.messages == ({"role": "user", "content": "1+1?"},)
  assert (first.answer, first.verifier) == ("2", "math")
  # The replaced `answer` column is kept in meta, as any extra column.
  assert first.meta["answer"] == "not this"
  assert (second.prompt, second.answer, second.verifier) == ("2+2?", "4",
                                                             "numeric")
  # Parquet rows go through the same mapping.
  table = tmp_path / "qa.parquet"
  pq.write_table(pa.Table.from_pylist([
      {"question": "3+3?", "solution": 6}, {"question": "4+4?"}]), table)
  result = records.read_records(_spec(table, **MAPPED), skip_bad_rows=True)
  assert [(r.prompt, r.answer) for r in result.records] == [("3+3?", "6")]
  assert "qa.parquet:2: field 'solution': missing" in result.errors[0]


def test_default_mapping_leaves_rows_alone_and_bad_keys_are_named():
  row = {"prompt": "x", "answer": "1"}
  assert columns_lib.Columns().remap(row) is row
  with pytest.raises(config_lib.ConfigError, match="data.prompt_key"):
    config_lib.from_mapping(prompts.DataConfig, {"prompt_key": ""}, "data")
  with pytest.raises(config_lib.ConfigError, match="data.default_verifier"):
    config_lib.from_mapping(prompts.DataConfig, {"default_verifier": 3},
                            "data")
  cfg = config_lib.from_mapping(prompts.DataConfig, {
      "train_files": [{"path": "a.jsonl", "verifier": "math"}, "b.jsonl"],
      "default_verifier": "numeric"}, "data")
  assert [s.verifier for s in cfg.train_files] == ["math", "numeric"]
