"""The `reasoning_gym` verifier: reasoning-gym's own scorer per dataset.

Records generated with reasoning-gym (https://github.com/open-thought/
reasoning-gym, `pip install reasoning-gym`) carry the generated entry, so the
dataset's `score_answer(answer, entry)` can judge the model's answer:

  {"prompt": entry["question"], "answer": entry["answer"],
   "verifier": "reasoning_gym", "task": "reasoning_gym/<dataset>",
   "meta": {"reasoning_gym": {"dataset": "<dataset>", "entry": entry}}}

`make_record(dataset, entry)` builds one. The entry must keep its
`metadata` (several scorers read it); it survives a JSON round trip.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

from brorl_jax.rewards import formatting
from brorl_jax.rewards.config import RewardsConfig

_DEFAULT = RewardsConfig()
_INSTALL = ("the 'reasoning_gym' verifier needs the reasoning-gym package: "
            "pip install 'reasoning-gym>=0.1.25,<0.2'")


def make_record(dataset: str, entry: Mapping[str, Any]) -> dict[str, Any]:
  """A dataset record for one reasoning-gym entry (see the module doc).

  Args:
    dataset: the reasoning-gym dataset name, e.g. "basic_arithmetic".
    entry: the generated entry: {"question", "answer", "metadata"}.

  Returns:
    The record, ready for a JSONL file.
  """
  return {"prompt": entry["question"], "answer": str(entry["answer"]),
          "verifier": "reasoning_gym", "task": f"reasoning_gym/{dataset}",
          "meta": {"reasoning_gym": {"dataset": dataset,
                                     "entry": dict(entry)}}}


@functools.lru_cache(maxsize=256)
def _scorer(dataset: str) -> Callable[[str | None, dict[str, Any]], float]:
  try:
    # Imported here: reasoning-gym is optional (the `test` extra).
    import reasoning_gym  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(_INSTALL) from e
  try:
    return reasoning_gym.get_score_answer_fn(dataset)
  except ValueError as e:
    raise ValueError(f"reasoning_gym verifier: unknown dataset {dataset!r} "
                     f"({e})") from e


def verify_reasoning_gym(completion: str, answer: str, *,
                         config: RewardsConfig | None = None,
                         reasoning_gym: Mapping[str, Any] | None = None,
                         **meta) -> float:
  """Scores with the reasoning-gym dataset's own `score_answer`.

  The model's answer is the content of the last `<answer>...</answer>` (the
  reasoning-gym prompt convention; the tag is `reasoning_gym.answer_tag`),
  else the last `\\boxed{}`, else None (which its scorers give 0). The
  reward is the scorer's value (in [0, 1]; some datasets give partial
  credit).

  Examples (dataset / gold -> completion -> reward):
    basic_arithmetic / `-4` -> "... <answer>-4</answer>" -> 1.0
    basic_arithmetic / `-4` -> "<answer>4</answer>" -> 0.0
    any dataset -> a completion without a tag or box -> 0.0

  Args:
    completion: the model's text.
    answer: the gold answer (used when the entry has none).
    config: the rewards config (defaults when None).
    reasoning_gym: the record's `meta["reasoning_gym"]`: {"dataset": name,
      "entry": {"question", "answer", "metadata"}}.
    **meta: the record's other fields; ignored.

  Returns:
    The scorer's reward (`format.unmet_reward` when a format requirement is
    unmet).

  Raises:
    ValueError: the record has no `meta.reasoning_gym.dataset`.
    ImportError: reasoning-gym is not installed (names the package).
  """
  del meta
  config = config or _DEFAULT
  if not isinstance(reasoning_gym, Mapping) or not reasoning_gym.get(
      "dataset"):
    raise ValueError("reasoning_gym verifier: the record needs meta."
                     "reasoning_gym = {'dataset': name, 'entry': {...}}")
  score_answer = _scorer(str(reasoning_gym["dataset"]))
  entry = dict(reasoning_gym.get("entry") or {})
  entry.setdefault("answer", answer)
  entry.setdefault("metadata", {})
  text = formatting.apply_format(completion, config.format)
  if text is None:
    return config.format.unmet_reward
  prediction = formatting.last_tag(text, config.reasoning_gym.answer_tag)
  if prediction is None:
    prediction = formatting.last_boxed(text)
  return float(score_answer(prediction, entry))
