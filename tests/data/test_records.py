"""Dataset records: the real benchmark files and hand-made bad rows."""

import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from brorl_jax.data import records

BENCH = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"
GOOD = {"prompt": "1+1?", "answer": "2", "verifier": "math"}


@pytest.mark.parametrize("name,count", [("math500", 500), ("gsm8k", 1319),
                                        ("aime24", 30), ("amc23", 40)])
def test_benchmark_files(name, count):
  result = records.read_records(BENCH / f"{name}.jsonl")
  assert (len(result.records), result.rows, result.bad_rows) == (count, count,
                                                                 0)
  first = result.records[0]
  assert (first.task, first.verifier, first.messages) == (name, "math", None)
  assert first.prompt and first.answer and first.meta["id"]
  assert first.to_row() == json.loads(
      (BENCH / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[0])


def test_benchmark_answers():
  aime = records.read_records(BENCH / "aime24.jsonl").records
  assert aime[0].answer == "204" and aime[0].meta["id"] == "2024-AIME-I-1"
  math500 = records.read_records(BENCH / "math500.jsonl").records
  assert math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"


def _write(path, lines):
  path.write_bytes(b"\n".join(
      line if isinstance(line, bytes) else line.encode() for line in lines)
                   + b"\n")
  return path


BAD_ROWS = [
    # (line content, field named in the error, message fragment)
    (b'{"prompt": "x", "answer": "1", "verifier": "math"', None, "bad JSON"),
    (b'{"prompt": "caf\xe9", "answer": "1", "verifier": "math"}', None,
     "invalid UTF-8"),
    (b'["not", "an", "object"]', None, "JSON object"),
    (json.dumps({"answer": "1", "verifier": "math"}).encode(), "prompt",
     "exactly one of"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": "x"}]}
                ).encode(), "prompt", "exactly one of"),
    (json.dumps({"prompt": "x", "verifier": "math"}).encode(), "answer",
     "missing"),
    (json.dumps({**GOOD, "answer": [2]}).encode(), "answer",
     "string or a number"),
    (json.dumps({**GOOD, "verifier": None}).encode(), "verifier", "missing"),
    (json.dumps({**GOOD, "verifier": 3}).encode(), "verifier", "string"),
    (json.dumps({**GOOD, "prompt": 5}).encode(), "prompt", "string"),
    (json.dumps({**GOOD, "prompt": "  "}).encode(), "prompt", "empty"),
    (json.dumps({"messages": [{"role": "user"}], "answer": "1",
                 "verifier": "math"}).encode(), "messages", "message 0"),
    (json.dumps({**GOOD, "meta": [1]}).encode(), "meta", "object"),
    (json.dumps({**GOOD, "tests": {"inputs": ["1"], "outputs": []}}).encode(),
     "tests", "same length"),
    (json.dumps({**GOOD, "task": 7}).encode(), "task", "string"),
    (json.dumps({**GOOD, "id": 1, "meta": {"id": 2}}).encode(), "id",
     "both a top-level field and a meta key"),
    # Lone surrogates (valid JSON escapes, not text; issue 35.3).
    (b'{"prompt": "x", "answer": "69\\ud800", "verifier": "math"}', "answer",
     "not valid UTF-8 text: '\\ud800' at character 2"),
    (b'{"prompt": "x\\udc00", "answer": "1", "verifier": "math"}', "prompt",
     "not valid UTF-8 text"),
    (b'{"messages": [{"role": "user", "content": "\\ud83d"}], "answer": "1",'
     b' "verifier": "math"}', "messages", "not valid UTF-8 text"),
    (json.dumps({**GOOD, "meta": {"k": ["ok", "\ud800"]}}).encode(), "meta",
     "not valid UTF-8 text"),
    (json.dumps({**GOOD, "x\udfff": 1}).encode(), None,
     "a field name is not valid UTF-8 text"),
    # Non-finite numbers (Python's json reads these literals).
    (b'{"prompt": "x", "answer": NaN, "verifier": "numeric"}', "answer",
     "finite number"),
    (b'{"prompt": "x", "answer": -Infinity, "verifier": "numeric"}', "answer",
     "finite number"),
]


@pytest.mark.parametrize("line,field,fragment", BAD_ROWS)
def test_bad_row_raises_with_location(tmp_path, line, field, fragment):
  path = _write(tmp_path / "d.jsonl", [json.dumps(GOOD).encode(), b"", line])
  with pytest.raises(records.DataError) as info:
    records.read_records(path)
  err = info.value
  assert (err.path, err.line, err.field) == (str(path), 3, field)
  assert fragment in str(err) and f"{path}:3:" in str(err)
  assert "skip_bad_rows" in str(err)


def test_skip_bad_rows_counts(tmp_path):
  lines = [json.dumps(GOOD).encode()] + [row for row, _, _ in BAD_ROWS] + [
      json.dumps({**GOOD, "answer": 3}).encode()]
  result = records.read_records(_write(tmp_path / "d.jsonl", lines),
                                skip_bad_rows=True)
  assert (result.rows, result.bad_rows) == (len(BAD_ROWS) + 2, len(BAD_ROWS))
  assert [r.answer for r in result.records] == ["2", "3"]
  assert len(result.errors) == 5 and ":2:" in result.errors[0]


def test_defaults_extras_and_code_rows(tmp_path):
  rows = [
      {"prompt": "p", "answer": 12.5, "extra": [1], "meta": {"k": "v"}},
      {"messages": [{"role": "system", "content": "s"},
                    {"role": "user", "content": "u"}], "answer": "a",
       "verifier": "exact", "task": "mine"},
      {"prompt": "code", "verifier": "code",
       "tests": json.dumps({"inputs": ["1\n"], "outputs": ["2\n"]})},
  ]
  path = _write(tmp_path / "mixed.v2.jsonl", [json.dumps(r) for r in rows])
  spec = records.FileSpec(path=str(path), verifier="math")
  a, b, c = records.read_records(spec).records
  assert (a.task, a.verifier, a.answer) == ("mixed", "math", "12.5")
  assert a.meta == {"k": "v", "extra": [1]}
  assert (b.task, b.verifier, b.prompt) == ("mine", "exact", None)
  assert b.messages[1] == {"role": "user", "content": "u"}
  assert (c.answer, c.tests) == ("", {"inputs": ["1\n"], "outputs": ["2\n"]})
  # Without a default verifier, rows without one are malformed.
  with pytest.raises(records.DataError, match="field 'verifier': missing"):
    records.read_records(path)
  spec = records.FileSpec(path=str(path), task="t", verifier="math")
  assert records.read_records(spec).records[0].task == "t"


def test_known_verifiers(tmp_path):
  path = _write(tmp_path / "d.jsonl",
                [json.dumps(GOOD), json.dumps({**GOOD, "verifier": "mth"})])
  with pytest.raises(records.DataError, match=r"d.jsonl:2: field 'verifier': "
                     "unknown verifier 'mth'; registered: code, math"):
    records.read_records(path, known_verifiers={"math", "code"})
  result = records.read_records(path, known_verifiers={"math"},
                                skip_bad_rows=True)
  assert (len(result.records), result.bad_rows) == (1, 1)


def test_parquet(tmp_path):
  table = pa.table({
      "prompt": ["a", "b", None],
      "answer": ["1", "2", "3"],
      "verifier": ["math", "math", "math"],
      "meta": [{"level": 1}, {"level": 2}, {"level": 3}],
  })
  path = tmp_path / "train.parquet"
  pq.write_table(table, path)
  with pytest.raises(records.DataError) as info:
    records.read_records(path)
  assert (info.value.line, info.value.field) == (3, "prompt")
  result = records.read_records(path, skip_bad_rows=True)
  assert [(r.prompt, r.meta["level"], r.task) for r in result.records] == [
      ("a", 1, "train"), ("b", 2, "train")]
  assert (result.rows, result.bad_rows) == (3, 1)
  # A binary column is a mistyped field, not text.
  pq.write_table(pa.table({"prompt": pa.array([b"\xff"], pa.binary()),
                           "answer": ["1"], "verifier": ["math"]}), path)
  with pytest.raises(records.DataError,
                     match=r"train.parquet:1: field 'prompt': must be a "
                     "string, got bytes"):
    records.read_records(path)


def test_file_errors(tmp_path):
  with pytest.raises(records.DataError, match="file not found"):
    records.read_records(tmp_path / "missing.jsonl")
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(records.DataError, match="unknown format"):
    records.read_records(tmp_path / "x.csv")
  (tmp_path / "bad.parquet").write_text("not parquet")
  with pytest.raises(records.DataError, match="not a readable Parquet"):
    records.read_records(tmp_path / "bad.parquet")
  path = _write(tmp_path / "allbad.jsonl", [b"{", b"}"])
  with pytest.raises(records.DataError, match=r"no valid records \(2 rows, 2"):
    records.read_records(path, skip_bad_rows=True)


def test_file_spec_parse():
  assert records.FileSpec.parse("a.jsonl") == records.FileSpec("a.jsonl")
  spec = records.FileSpec.parse({"path": "a.jsonl", "weight": 2})
  assert spec.weight == 2.0
  with pytest.raises(ValueError, match="needs 'path'"):
    records.FileSpec.parse({"file": "a.jsonl"})


def test_number_answers_read_in_their_shortest_form(tmp_path):
  lines = [json.dumps({**GOOD, "answer": a}).encode()
           for a in (69.0, 69, 0.5, -3.0, 1e300, "69.0")]
  answers = [r.answer for r in records.read_records(
      _write(tmp_path / "d.jsonl", lines)).records]
  assert answers == ["69", "69", "0.5", "-3", "1e+300", "69.0"]
