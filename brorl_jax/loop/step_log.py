"""What one RL step logs, on the host: its metrics row and its rollouts.

The train loop gathers the step's device scalars (already under their
logged names) in one transfer (`to_host`), adds the per-task rewards
(`task_rewards`) and the reward pool's counters summed over processes
(`global_verify_stats`), and archives the rollouts with a few decoded texts
(`log_rollouts`). In a multi-process run
every function here that gathers is a collective: every process calls it.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import numpy as np

from brorl_jax import distributed
from brorl_jax.loop.rollout_archive import STATUS_NAMES, RolloutArchive
from brorl_jax.loop.scoring import Scored

def to_host(metrics: dict[str, Any]) -> dict[str, float]:
  """Device scalars -> Python numbers (one explicit transfer)."""
  values = jax.device_get(metrics)
  return {k: (v.item() if hasattr(v, "item") else v)
          for k, v in values.items()}


def task_rewards(records: Sequence[Any], rewards: jax.Array,
                 replicated, valid: jax.Array | None = None
                 ) -> dict[str, float]:
  """Per task family mean reward, `reward/<task>/mean`; {} for one family.

  Args:
    records: the step's prompt records (`.task`), one per row of `rewards`.
    rewards: [P, G] global rewards (their transfer is small).
    replicated: the sampling mesh's replicated sharding (for the gather).
    valid: optional [P, G] bool, the rollouts that exist (adaptive
      allocation's unused rows are placeholders with reward 0: not counted).
  """
  r = distributed.fetch(rewards, replicated)                    # [P, G]
  ok = (np.ones(r.shape, bool) if valid is None
        else distributed.fetch(valid, replicated))
  tasks: dict[str, list[float]] = {}
  for rec, row, keep in zip(records, r, ok):
    tasks.setdefault(rec.task, []).extend(row[keep].tolist())
  if len(tasks) < 2:
    return {}
  return {f"reward/{t}/mean": float(np.mean(v)) for t, v in tasks.items()}


def global_verify_stats(local: dict[str, float],
                        verifiers: Iterable[str]) -> dict:
  """The reward pool's counters (rewards/stats.py) over all processes.

  Each process scores only its own rollouts; means are re-weighted by the
  per-process counts. `verifiers` (the step's records' verifier names, the
  same on every process) fixes the keys every process contributes.
  """
  if jax.process_count() == 1:
    return local
  names = sorted(verifiers)
  sums = dict(local)
  for v in names:  # means -> sums, so they add up over processes
    count = local.get(f"{v}/count", 0)
    for m in ("mean_reward", "mean_latency_s"):
      sums[f"{v}/{m}"] = local.get(f"{v}/{m}", 0.0) * count
  keys = ["items", "timeouts", "errors", "restarts", "recycled"] + [
      f"{v}/{k}" for v in names for k in ("count", "mean_reward",
                                          "mean_latency_s", "timeouts",
                                          "errors")]
  total = distributed.sum_over_processes(sums, keys)
  out = {k: int(round(total[k])) for k in keys}
  for v in names:
    for m in ("mean_reward", "mean_latency_s"):
      out[f"{v}/{m}"] = total[f"{v}/{m}"] / max(total[f"{v}/count"], 1)
  return out


def log_rollouts(archive: RolloutArchive, step: int, prompts: Any,
                 scored: Scored, *, log_cfg: Any, replicated, tokenizer: Any,
                 prompt_text) -> None:
  """Archives the step's rollouts and a few decoded texts (process 0 writes).

  In a multi-process run the rollouts are gathered from every process
  (collectives: every process gets here, and the conditions depend on the
  config only).

  Args:
    archive: the run's rollout archive (disabled off process 0).
    step: the step number the metrics use (completed steps).
    prompts: the step's prompt batch (`tokens`, `lengths`, `records`).
    scored: the step's `scoring.Scored`.
    log_cfg: the `logging` section (`archive_rollouts`, `archive_every`,
      `text_samples`).
    replicated: the sampling mesh's replicated sharding (for the gathers).
    tokenizer: decodes the picked rows where they were not decoded here.
    prompt_text: record -> the prompt's text, as the model saw it.
  """
  ro = scored.rollouts
  if log_cfg.archive_rollouts and step % log_cfg.archive_every == 0:
    tok, lens, lp, rew, st = (distributed.fetch(x, replicated) for x in (
        ro.tokens, ro.lengths, ro.logprobs, scored.rewards, scored.status))
    archive.append(
        step, prompt_ids=[prompts.tokens[i, -prompts.lengths[i]:]
                          for i in range(len(prompts.records))],
        completion_ids=tok, lengths=lens, logprobs=lp, rewards=rew,
        status=st)
  n = log_cfg.text_samples
  if not (n and log_cfg.archive_rollouts):
    return
  num_p, num_g = scored.rewards.shape
  # An even spread over the step's rollouts, the same on every process.
  picked = [(i // num_g, i % num_g)
            for i in range(0, num_p * num_g, max(1, num_p * num_g // n))][:n]
  if jax.process_count() == 1:
    texts = [scored.texts[key] for key in picked]
  else:
    # The texts were decoded where the rollouts live: fetch the picked
    # rows' tokens and decode them here.
    rows = np.array([p * num_g + g for p, g in picked], np.int32)
    tok, lens = distributed.fetch_rows(ro.tokens, ro.lengths, rows,
                                       replicated)
    texts = tokenizer.decode_batch(
        [t[:k].tolist() for t, k in zip(tok, lens)])
  rewards, status = (distributed.fetch(x, replicated)
                     for x in (scored.rewards, scored.status))
  archive.write_text_samples(step, [{
      "prompt": prompt_text(prompts.records[p]),
      "completion": text, "answer": prompts.records[p].answer,
      "reward": float(rewards[p, g]),
      "status": STATUS_NAMES[int(status[p, g])]}
      for (p, g), text in zip(picked, texts)])
