"""What the sampler is asked for, and how its decode is cut into rows.

`SamplerConfig` holds the sampling settings (config section `rollout`, or
`eval`); `plan_chunks` and `refill_plan` split a step's P x G rollouts into
decode chunks or refill slot pools of at most `max_decode_rows` rows (the
sampler runs them, the dry run sizes them).
"""

from __future__ import annotations

import dataclasses

from brorl_jax.config import check


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Sampling settings (config section `rollout`, or `eval` for evaluation).

  Attributes:
    n: G, rollouts per prompt (the paper's N).
    max_prompt_len: Lp; prompts are left-padded to it. Longer prompts are an
      error here (the data pipeline filters and counts them first).
    max_new_tokens: T, the response length limit.
    max_decode_rows: most rollout rows decoded at once (P*G is split into
      chunks of at most this many rows; size it to the KV memory).
    temperature: softmax temperature (0 = greedy).
    top_p: nucleus mass in (0, 1].
    top_k: keep the k most likely tokens (0 = no limit).
    greedy: argmax decoding.
    early_stop: end the decode loop once every row of a chunk is done (turn
      off to time a fixed number of tokens).
    refill: decode with refilled slots (`refill.py`): each prompt owns
      max_decode_rows / P slots and a queue of its rollouts, and a slot whose
      rollout ends takes the next one. False: fixed chunks of rows that run
      until the chunk's longest row ends. Both draw the same tokens.
    segment_steps: the refill decode returns to the host every this many
      steps (to score finished rollouts and honour a preemption); size it
      so that a segment takes well under `checkpoint.preempt_grace_s`.
  """

  n: int = 16
  max_prompt_len: int = 256
  max_new_tokens: int = 1024
  max_decode_rows: int = 4096
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  greedy: bool = False
  early_stop: bool = True
  refill: bool = False
  segment_steps: int = 256
  # The section named in error messages; not a config key.
  section: str = dataclasses.field(default="rollout", compare=False,
                                   metadata={"config_key": False})

  def __post_init__(self):
    s = self.section
    check(isinstance(self.n, int) and self.n >= 1, f"{s}.n",
          f"must be an integer >= 1, got {self.n!r}")
    check(self.max_prompt_len >= 1, f"{s}.max_prompt_len", "must be >= 1")
    check(self.max_new_tokens >= 1, f"{s}.max_new_tokens", "must be >= 1")
    check(self.max_decode_rows >= 1, f"{s}.max_decode_rows", "must be >= 1")
    check(self.temperature >= 0, f"{s}.temperature",
          f"must be >= 0 (0 = greedy), got {self.temperature}")
    check(0 < self.top_p <= 1, f"{s}.top_p",
          f"must be in (0, 1], got {self.top_p}")
    check(isinstance(self.top_k, int) and self.top_k >= 0, f"{s}.top_k",
          f"must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
    check(isinstance(self.segment_steps, int) and self.segment_steps >= 1,
          f"{s}.segment_steps",
          f"must be an integer >= 1, got {self.segment_steps!r}")

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0

  @property
  def logprob_temperature(self) -> float:
    """The temperature of the recorded log-probs (1 when greedy); the loss
    and the diagnostics re-score at the same one."""
    return 1.0 if self.is_greedy else self.temperature



def plan_chunks(num_prompts: int, group: int, max_rows: int
                ) -> tuple[int, int]:
  """(prompts, rollouts) per decode chunk: equal chunks of <= max_rows rows.

  Chunks split the group first, so that every chunk holds every prompt:
  prompts are sharded over the data axes (and over hosts), so each chunk
  keeps every device busy. Only when the prompts alone exceed `max_rows`
  are they split too.
  """
  def largest_divisor(n, limit):
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= limit)
  if num_prompts * group <= max_rows:
    return num_prompts, group
  pc = num_prompts if num_prompts <= max_rows else largest_divisor(
      num_prompts, max_rows)
  return pc, largest_divisor(group, max(max_rows // pc, 1))


def refill_plan(num_prompts: int, group: int, max_rows: int
                ) -> tuple[int, int]:
  """(prompts per refill decode, slots per prompt) within max_rows slots.

  The prompts are split as `plan_chunks` splits them (all of them together
  unless they alone exceed max_rows); each gets an equal pool of slots.
  """
  pc = plan_chunks(num_prompts, group, max_rows)[0]
  return pc, min(group, max(max_rows // pc, 1))
