"""loop/plateau.py: the plateau stop's bookkeeping in the loop's meta."""

from brorl_jax import run_config
from brorl_jax.loop.plateau import PlateauStop


def _meta(tokens=0):
  return {"generated_tokens_total": tokens}


def test_off_or_without_an_evaluation_it_records_nothing():
  meta = _meta()
  assert not PlateauStop(run_config.EvalConfig()).record(
      meta, 0, {"eval/pass@1": 0.1})
  assert PlateauStop(run_config.EvalConfig(every=1, plateau_window=3)).record(
      meta, 1, {"reward/mean": 0.2}) is False
  assert meta == _meta() and not PlateauStop.reached(meta)


def test_it_stops_at_the_first_flat_window_and_keeps_its_history():
  stop = PlateauStop(run_config.EvalConfig(every=1, plateau_window=3))
  meta = _meta()
  # Rising exactly linearly, then bending over: (tokens, pass@1).
  curve = [(0, 0.10), (100, 0.20), (200, 0.30), (300, 0.40), (400, 0.40)]
  fired = []
  for step, (tokens, pass1) in enumerate(curve):
    meta["generated_tokens_total"] = tokens
    metrics = {"eval/pass@1": pass1}
    fired.append(stop.record(meta, step, metrics))
    assert ("eval/plateau" in metrics) == fired[-1]
  # Windows 0.1-0.3 and 0.2-0.4 rise without scatter; 0.3, 0.4, 0.4 has a
  # slope of 0.0005 per token under its one-sided t_1 bound (6.31 x se =
  # 0.0018): not significantly rising, so the run stops at step 4.
  assert fired == [False, False, False, False, True]
  assert meta["plateau_step"] == 4 and PlateauStop.reached(meta)
  assert meta["eval_history"] == [list(p) for p in curve]
