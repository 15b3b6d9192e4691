"""The grain prompt pipeline: layout, filtering, order, sharding, resume."""

import collections
import json
import pathlib

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from brorl_jax import config as config_lib
from brorl_jax.data import prompts
from brorl_jax.data import records
from brorl_jax.data import tasks

BENCH = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"
LP = 48


def _task_file(path, n, seed=0, task="arithmetic"):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row) + "\n" for row in tasks.generate(task, n,
                                                                  seed))
  return str(path)


def _pipeline(tok, train=(), evals=(), *, lp=LP, p=4, index=0, count=1,
              **kwargs):
  cfg = prompts.DataConfig(train_files=train, eval_files=evals, **kwargs)
  return prompts.PromptPipeline(cfg, tok, max_prompt_len=lp,
                                prompts_per_step=p, process_index=index,
                                process_count=count)


def _ids(batch):
  return [r.meta["id"] for r in batch.records]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.tokens, y.tokens)
    np.testing.assert_array_equal(x.lengths, y.lengths)
    assert _ids(x) == _ids(y)


def test_batch_layout(spm_tokenizer, tmp_path):
  tok = spm_tokenizer
  pipe = _pipeline(tok, [_task_file(tmp_path / "a.jsonl", 20)])
  batch = next(pipe.train_iterator())
  assert batch.tokens.shape == (4, LP) and batch.tokens.dtype == np.int32
  assert batch.lengths.dtype == np.int32 and batch.valid.all()
  for row, record in enumerate(batch.records):
    ids = tok.encode(pipe.prompt_text(record))
    n = batch.lengths[row]
    assert n == len(ids)
    assert batch.tokens[row, LP - n:].tolist() == ids  # left-padded
    assert (batch.tokens[row, :LP - n] == tok.pad_id).all()
    assert batch.mask()[row].tolist() == [False] * (LP - n) + [True] * n
    assert record.prompt in tok.decode(ids)


def test_prompt_text(qwen2_tokenizer):
  record = records.Record(answer="2", verifier="math", task="t", prompt="Q")
  pipe = _pipeline(qwen2_tokenizer, system_prompt="S", instruction=" I")
  assert pipe.prompt_text(record) == (
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ I<|im_end|>\n"
      "<|im_start|>assistant\n")
  conversation = records.Record(
      answer="2", verifier="math", task="t",
      messages=({"role": "system", "content": "Mine"},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}))
  assert pipe.prompt_text(conversation) == (
      "<|im_start|>system\nMine<|im_end|>\n<|im_start|>user\nQ I<|im_end|>\n"
      "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>assistant\n")
  raw = _pipeline(qwen2_tokenizer, instruction=" I", apply_chat_template=False)
  assert raw.prompt_text(record) == "Q I"
  with pytest.raises(ValueError, match="apply_chat_template=True"):
    raw.prompt_text(conversation)


def test_long_prompts_dropped_and_counted(qwen2_tokenizer):
  pipe = _pipeline(qwen2_tokenizer, [str(BENCH / "amc23.jsonl")],
                   [str(BENCH / "aime24.jsonl")], lp=160, p=8)
  lengths = [len(qwen2_tokenizer.encode(pipe.prompt_text(r)))
             for r in records.read_records(BENCH / "amc23.jsonl").records]
  too_long = sum(n > 160 for n in lengths)
  assert 0 < too_long < 40
  (stats,) = pipe.file_stats("train")
  assert (stats.rows, stats.too_long, stats.kept, stats.longest) == (
      40, too_long, 40 - too_long, max(lengths))
  assert pipe.metrics() == {"data/train/rows": 40, "data/train/bad_rows": 0,
                            "data/train/too_long": too_long,
                            "data/train/kept": 40 - too_long}
  # Kept prompts are whole: their ids are the full encoding.
  for batch in _take(pipe.train_iterator(), 5):
    for row, record in enumerate(batch.records):
      ids = qwen2_tokenizer.encode(pipe.prompt_text(record))
      assert batch.tokens[row, 160 - len(ids):].tolist() == ids
  with pytest.raises(records.DataError, match="every prompt is longer"):
    _pipeline(qwen2_tokenizer, [str(BENCH / "aime24.jsonl")],
              lp=20).file_stats()


def test_epochs_shuffle_and_end(spm_tokenizer, tmp_path):
  path = _task_file(tmp_path / "a.jsonl", 10)
  pipe = _pipeline(spm_tokenizer, [path], p=5, num_epochs=3, seed=7)
  batches = list(pipe.train_iterator())
  assert len(batches) == 6
  epochs = [_ids(batches[i]) + _ids(batches[i + 1]) for i in range(0, 6, 2)]
  expected = sorted(f"arithmetic-0-{i}" for i in range(10))
  assert all(sorted(e) == expected for e in epochs)
  assert len({tuple(e) for e in epochs}) == 3  # reshuffled each epoch
  assert epochs[0] != expected
  same = list(_pipeline(spm_tokenizer, [path], p=5, num_epochs=3,
                        seed=7).train_iterator())
  _assert_same(batches, same)
  other = list(_pipeline(spm_tokenizer, [path], p=5, num_epochs=3,
                         seed=8).train_iterator())
  assert [_ids(b) for b in other] != [_ids(b) for b in batches]
  ordered = _pipeline(spm_tokenizer, [path], p=5, shuffle=False)
  assert _ids(next(ordered.train_iterator())) == expected[:5]


def test_partial_last_batch_dropped(spm_tokenizer, tmp_path):
  pipe = _pipeline(spm_tokenizer, [_task_file(tmp_path / "a.jsonl", 10)],
                   p=4, num_epochs=1)
  assert len(list(pipe.train_iterator())) == 2


@pytest.mark.parametrize("weights,share_a", [((3.0, 1.0), 0.75),
                                             ((None, None), 0.25)])
def test_mixture_weights(spm_tokenizer, tmp_path, weights, share_a):
  a = _task_file(tmp_path / "a.jsonl", 10, task="arithmetic")
  b = _task_file(tmp_path / "b.jsonl", 30, task="countdown")
  specs = [{"path": a, "weight": weights[0]}, {"path": b, "weight": weights[1]}]
  pipe = _pipeline(spm_tokenizer, specs, lp=64, p=8)
  tasks_seen = collections.Counter(
      r.task for batch in _take(pipe.train_iterator(), 50)
      for r in batch.records)
  assert abs(tasks_seen["arithmetic"] / 400 - share_a) < 0.02
  # num_epochs with several files: epochs x total prompts.
  pipe = _pipeline(spm_tokenizer, specs, lp=64, p=8, num_epochs=2)
  assert len(list(pipe.train_iterator())) == 2 * 40 // 8


def test_process_sharding_gives_global_batch(spm_tokenizer, tmp_path):
  path = _task_file(tmp_path / "a.jsonl", 30)
  whole = _take(_pipeline(spm_tokenizer, [path], p=8).train_iterator(), 6)
  parts = [_take(_pipeline(spm_tokenizer, [path], p=8, index=i,
                           count=2).train_iterator(), 6) for i in range(2)]
  for k in range(6):
    assert parts[0][k].tokens.shape == (4, LP)
    np.testing.assert_array_equal(
        np.concatenate([parts[0][k].tokens, parts[1][k].tokens]),
        whole[k].tokens)
    assert _ids(parts[0][k]) + _ids(parts[1][k]) == _ids(whole[k])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_from_state(spm_tokenizer, tmp_path, prefetch):
  path = _task_file(tmp_path / "a.jsonl", 17)
  it = _pipeline(spm_tokenizer, [path], prefetch=prefetch).train_iterator()
  _take(it, 3)
  state = it.get_state()
  reference = _take(it, 9)  # crosses epoch boundaries (17 prompts)
  fresh = _pipeline(spm_tokenizer, [path], prefetch=prefetch).train_iterator()
  fresh.set_state(state)
  _assert_same(_take(fresh, 9), reference)


def test_resume_through_orbax(spm_tokenizer, tmp_path):
  path = _task_file(tmp_path / "a.jsonl", 17)
  a, b = [{"path": path, "weight": 2.0},
          {"path": _task_file(tmp_path / "b.jsonl", 9, task="countdown"),
           "weight": 1.0}]
  make = lambda: _pipeline(spm_tokenizer, [a, b], lp=64).train_iterator()
  uninterrupted = _take(make(), 12)
  it = make()
  _take(it, 5)
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  manager.save(5, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  _take(it, 2)  # progress after the save is lost, as after a preemption
  restored = make()
  manager.restore(5, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(restored)))
  manager.close()
  _assert_same(_take(restored, 7), uninterrupted[5:])


def test_eval_every_record_once(spm_tokenizer, tmp_path):
  path = _task_file(tmp_path / "e.jsonl", 11, seed=5)
  seen = []
  for index in range(2):
    pipe = _pipeline(spm_tokenizer, evals=[path], p=4, index=index, count=2)
    assert pipe.num_eval_batches() == 3
    batches = list(pipe.eval_batches())
    assert len(batches) == 3
    for batch in batches:
      assert batch.tokens.shape == (2, LP)
      assert batch.lengths.min() >= 1
      seen += [r.meta["id"] for r, ok in zip(batch.records, batch.valid)
               if ok]
    assert batches[-1].valid.tolist() == [[True, True], [True, False]][index]
    if index == 1:  # the filler row copies a real prompt of its batch
      assert _ids(batches[-1])[1] == _ids(batches[-1])[0]
  assert len(seen) == 11
  assert sorted(seen) == sorted(f"arithmetic-5-{i}" for i in range(11))
  pipe = _pipeline(spm_tokenizer, evals=[path], p=4)
  batches = list(pipe.eval_batches(batch_size=8))
  assert [b.valid.sum() for b in batches] == [8, 3]
  assert [r.meta["id"] for b in batches for r in b.records][:11] == [
      f"arithmetic-5-{i}" for i in range(11)]  # file order


def test_bad_rows_in_pipeline(spm_tokenizer, tmp_path):
  path = tmp_path / "a.jsonl"
  _task_file(path, 8)
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"prompt": "x"}\n')
  with pytest.raises(records.DataError, match=r"a.jsonl:9: field 'answer'"):
    _pipeline(spm_tokenizer, [str(path)]).file_stats()
  pipe = _pipeline(spm_tokenizer, [str(path)], skip_bad_rows=True)
  assert pipe.file_stats()[0].bad_rows == 1
  assert pipe.metrics()["data/train/kept"] == 8


def test_a_lone_surrogate_is_a_bad_row_not_a_crash(spm_tokenizer, tmp_path):
  # Before: the prompt reached sentencepiece (TypeError, no file or line)
  # and the answer crashed step 1 writing samples.jsonl (issue 35.3).
  path = tmp_path / "a.jsonl"
  _task_file(path, 8)
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"prompt": "1+\\ud800", "answer": "2", "verifier": "numeric"}\n')
    f.write('{"prompt": "1+1", "answer": "69\\ud800", "verifier": "exact"}\n')
  with pytest.raises(records.DataError,
                     match=r"a.jsonl:9: field 'prompt': is not valid UTF-8"):
    _pipeline(spm_tokenizer, [str(path)]).file_stats()
  pipe = _pipeline(spm_tokenizer, [str(path)], skip_bad_rows=True)
  assert pipe.file_stats()[0].bad_rows == 2
  assert pipe.metrics()["data/train/kept"] == 8
  batch = next(iter(pipe.train_iterator()))
  assert all("\ud800" not in r.answer for r in batch.records)


def test_config_validation(spm_tokenizer):
  cfg = config_lib.from_mapping(prompts.DataConfig, {
      "train_files": ["a.jsonl", {"path": "b.parquet", "weight": 2}],
      "num_epochs": 2}, "data")
  assert cfg.train_files == (records.FileSpec("a.jsonl"),
                             records.FileSpec("b.parquet", weight=2.0))
  bad = [({"seed": -1}, "data.seed"), ({"num_epochs": 0}, "data.num_epochs"),
         ({"train_files": [{"path": "a", "weight": 0}]}, "data.train_files"),
         ({"train_files": [{"file": "a"}]}, "data.train_files"),
         ({"system_prompt": "S", "apply_chat_template": False},
          "data.system_prompt"),
         ({"shufle": True}, "data.shufle")]
  for section, key in bad:
    with pytest.raises(config_lib.ConfigError, match=f"'{key}'"):
      config_lib.from_mapping(prompts.DataConfig, section, "data")
  with pytest.raises(config_lib.ConfigError, match="rollout.prompts_per_step"):
    _pipeline(spm_tokenizer, ["a.jsonl"], p=6, count=4)
  with pytest.raises(config_lib.ConfigError, match="data.train_files"):
    _pipeline(spm_tokenizer).train_iterator()


def test_messages_need_chat_template(spm_tokenizer, tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}],
                              "answer": "1", "verifier": "math"}) + "\n")
  with pytest.raises(records.DataError,
                     match=r"m.jsonl: .*apply_chat_template=True"):
    _pipeline(spm_tokenizer, [str(path)],
              apply_chat_template=False).file_stats()
