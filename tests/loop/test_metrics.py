"""Tests for brorl_jax.metrics: JSONL round trip, truncation, TensorBoard."""

import json
import math
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX import crc32c
from tensorboardX.proto import event_pb2

from brorl_jax.loop import metrics as metrics_lib
from brorl_jax.loop.metrics import MetricsWriter, read_metrics


def _masked_crc(data: bytes) -> int:
  crc = crc32c.crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xa282ead8) & 0xffffffff


def read_events(workdir: pathlib.Path) -> list:
  """Every Event in the workdir's event files (TFRecord, CRCs checked).

  The `tensorboard` package (and its reader) is not installed; the format is
  small: u64 length, u32 masked CRC of it, the bytes, u32 masked CRC.
  """
  events = []
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,), (header_crc,) = (struct.unpack("<Q", header),
                                  struct.unpack("<I", data[pos + 8:pos + 12]))
      assert header_crc == _masked_crc(header)
      body = data[pos + 12:pos + 12 + length]
      (body_crc,) = struct.unpack("<I", data[pos + 12 + length:
                                             pos + 16 + length])
      assert body_crc == _masked_crc(body)
      events.append(event_pb2.Event.FromString(body))
      pos += 16 + length
  return events


def _scalars(events) -> dict:
  out = {}
  for event in events:
    for value in event.summary.value:
      out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_round_trip_types_and_nan(tmp_path):
  on_device = {"eval/pass@1": jnp.float32(0.5),
               "rollout/generated_tokens_total": jnp.int32(1234)}
  # The train loop runs with implicit transfers disallowed (STYLE.md §21).
  # (On CPU, reading a device array is not a guarded transfer, so this only
  # catches host-to-device traffic; the writer uses jax.device_get anyway.)
  with jax.transfer_guard("disallow"), MetricsWriter(tmp_path) as writer:
    record = writer.write(np.int64(3), on_device | {
        "reward/mean": np.float32(0.25),
        "loss/skipped": np.bool_(True),
        "mass/u2": float("nan"),
        "mass/margin": -np.inf,
        "time/sample_s": 1.5,
        "loss/count": np.array([7]),                # one-element array
    })
    writer.write(4, {"reward/mean": 0.75})
  expected = {"step": 3, "reward/mean": 0.25, "eval/pass@1": 0.5,
              "rollout/generated_tokens_total": 1234, "loss/skipped": 1,
              "mass/u2": None, "mass/margin": None, "time/sample_s": 1.5,
              "loss/count": 7}
  assert record == expected
  records = read_metrics(tmp_path)
  assert records == [expected, {"step": 4, "reward/mean": 0.75}]
  assert type(records[0]["rollout/generated_tokens_total"]) is int
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 2 and '"mass/u2": null' in lines[0]
  assert "NaN" not in lines[0] and "Infinity" not in lines[0]


def test_bad_values_are_rejected_by_name(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(TypeError, match="loss/vec"):
      writer.write(0, {"loss/vec": np.ones(3)})
    with pytest.raises(TypeError, match="note"):
      writer.write(0, {"note": "hello"})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(0, {"step": 1})
  assert not (tmp_path / "metrics.jsonl").exists()


def test_disabled_writer_is_a_no_op(tmp_path):
  workdir = tmp_path / "w"
  with MetricsWriter(workdir, enabled=False) as writer:
    assert writer.write(1, {"reward/mean": 1.0}) == {}
    assert writer.truncate_after(0) == 0
  assert not workdir.exists()


def test_truncate_after_equals_uninterrupted(tmp_path):
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  values = {s: {"reward/mean": s / 10, "mass/u2": s * 1e-3} for s in range(6)}
  with MetricsWriter(full, tensorboard=False) as writer:
    for s in range(6):
      writer.write(s, values[s])
  with MetricsWriter(resumed, tensorboard=False) as writer:
    for s in range(5):       # ran to step 4, checkpointed at step 2
      writer.write(s, values[s])
  with MetricsWriter(resumed, tensorboard=False) as writer:
    assert writer.truncate_after(2) == 2
    assert [r["step"] for r in read_metrics(resumed)] == [0, 1, 2]
    for s in range(3, 6):
      writer.write(s, values[s])
  assert ((resumed / "metrics.jsonl").read_bytes()
          == (full / "metrics.jsonl").read_bytes())
  assert not list(resumed.glob("*.tmp"))


def test_torn_last_line_is_repaired(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a"')   # crash mid-write
  assert read_metrics(tmp_path) == [{"step": 0, "a": 1}]
  with MetricsWriter(tmp_path, tensorboard=False) as writer:
    writer.write(1, {"a": 2})
  assert read_metrics(tmp_path) == [{"step": 0, "a": 1}, {"step": 1, "a": 2}]
  path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2"):
    read_metrics(tmp_path)


def test_missing_file_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "metrics.jsonl")):
    read_metrics(tmp_path)


def test_tensorboard_events_and_purge_on_resume(tmp_path):
  with MetricsWriter(tmp_path) as writer:
    for s in range(4):
      writer.write(s, {"reward/mean": s + 0.5, "mass/u2": float("nan")})
  scalars = _scalars(read_events(tmp_path))
  assert scalars["reward/mean"] == [(s, s + 0.5) for s in range(4)]
  assert all(math.isnan(v) for _, v in scalars["mass/u2"])
  with MetricsWriter(tmp_path) as writer:
    writer.truncate_after(1)
    writer.write(2, {"reward/mean": 9.0})
  events = read_events(tmp_path)
  # TensorBoard drops earlier events with step >= 2 when it sees this
  # SessionLog START (tensorboardX's purge_step).
  starts = [e.step for e in events
            if e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [2]
  assert _scalars(events)["reward/mean"][-1] == (2, 9.0)


def test_truncate_jsonl_keeps_steps_and_is_atomic(tmp_path):
  path = tmp_path / "x.jsonl"
  rows = [{"step": s, "v": s} for s in (0, 1, 1, 2, 3)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert metrics_lib.truncate_jsonl(path, 1) == 2
  assert metrics_lib.read_jsonl(path) == rows[:3]
  assert metrics_lib.truncate_jsonl(tmp_path / "missing.jsonl", 0) == 0

