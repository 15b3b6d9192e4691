"""The whole run's configuration: `RunConfig` and `load`.

Only the train loop (and the other entry points) read the
`ml_collections.ConfigDict`; `load` validates all of it into a `RunConfig`
whose sections are the typed dataclasses each stage defines next to its code
(e.g. `rollout.SamplerConfig`, `rl.losses.LossConfig`), plus the loop-level
sections defined here. This module sits above every stage config; the
validation helpers they share live in `config.py` on the ground floor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

from brorl_jax import progress as progress_lib
from brorl_jax.config import (check, check_choice, config_fields,
                              from_mapping, to_dict, unknown_key_error)
from brorl_jax.data.prompts import DataConfig
from brorl_jax.distributed import MeshConfig
from brorl_jax.model.config import DTYPES, ModelConfig, model_config
from brorl_jax.rewards import plugins as plugins_lib
from brorl_jax.rewards import registry
from brorl_jax.rewards.config import RewardsConfig
from brorl_jax.rl.advantages import AdvantageConfig
from brorl_jax.rl.allocation import AllocationConfig
from brorl_jax.rl.losses import LossConfig
from brorl_jax.rl.reference import ReferenceConfig
from brorl_jax.rl.shaping import ShapingConfig
from brorl_jax.rl.train_state import OptimConfig
from brorl_jax.rl.update import UpdateConfig
from brorl_jax.rollout.sampler import SamplerConfig
from brorl_jax.warmstart import WarmstartConfig

# ---- loop-level sections ---------------------------------------------------
# Sections read only by the train loop and the entry points. Library sections
# (model, data, rollout, rewards, algo.*, optim) are defined next to the code
# that uses them and assembled by `load`.

ALLOCATIONS = ("fixed", "adaptive")
WANDB_MODES = ("online", "offline", "disabled")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Checkpointing (section `checkpoint`).

  Attributes:
    every: save every this many RL steps (and at the end); 0 = only at the
      end and on preemption.
    keep: checkpoints kept (the newest).
    async_save: write in the background while training goes on.
    preempt_grace_s: on SIGTERM, the in-flight iteration is abandoned and
      the last completed state saved within this many seconds.
  """

  every: int = 10
  keep: int = 3
  async_save: bool = True
  preempt_grace_s: float = 30.0

  def __post_init__(self):
    check(self.every >= 0, "checkpoint.every", "must be >= 0")
    check(self.keep >= 1, "checkpoint.keep", "must be >= 1")
    check(self.preempt_grace_s > 0, "checkpoint.preempt_grace_s",
          "must be > 0")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation (section `eval`; files from `data.eval_files`).

  Attributes:
    every: evaluate every this many RL steps (and at step 0 and the end);
      0 = only at step 0 and the end.
    n: samples per prompt (pass@1 is averaged over them).
    k: the pass@k values reported (each <= n).
    max_prompts: evaluate at most this many held-out prompts (None = all).
    temperature / top_p / top_k / greedy / max_new_tokens / max_decode_rows:
      the evaluation's own sampling settings (the paper: T 0.6, top-p 0.95).
    suite: also evaluate the benchmark suite at every evaluation: "math",
      or a comma list of math500, aime24, amc23, gsm8k (`loop/suite.py`;
      `max_prompts` then applies per benchmark); None = off.
  """

  every: int = 0
  n: int = 4
  k: tuple[int, ...] = (1,)
  max_prompts: int | None = None
  temperature: float = 0.6
  top_p: float = 0.95
  top_k: int = 0
  greedy: bool = False
  max_new_tokens: int | None = None
  max_decode_rows: int | None = None
  suite: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "k", tuple(self.k))
    check(self.suite is None or isinstance(self.suite, str), "eval.suite",
          f"must be benchmark names (e.g. 'math') or None, got "
          f"{self.suite!r}")
    check(self.every >= 0, "eval.every", "must be >= 0")
    check(self.n >= 1, "eval.n", "must be >= 1")
    check(all(1 <= k <= self.n for k in self.k), "eval.k",
          f"each k must be in 1..eval.n={self.n}, got {self.k}")


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
  """Mass-balance diagnostics (section `diagnostics`).

  Attributes:
    every: compute the post-update (realized) diagnostics every this many
      steps; the pre-update terms are computed every step (they are cheap).
      0 = never.
    rescore_rollouts: rollouts re-scored before/after the update for the
      sequence-level Delta log pi (a random subset of the step's).
  """

  every: int = 1
  rescore_rollouts: int = 64

  def __post_init__(self):
    check(self.every >= 0, "diagnostics.every", "must be >= 0")
    check(self.rescore_rollouts >= 0, "diagnostics.rescore_rollouts",
          "must be >= 0")


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """Where the policy and tokenizer come from (section `init`).

  Attributes:
    path: None = fresh random init; a model directory (`hf import` output)
      or a Hugging Face directory (config.json + safetensors).
    tokenizer: a tokenizer directory; None = the one in `path`, or (fresh
      init) one trained on the training prompts (SentencePiece).
    tokenizer_vocab_size: vocabulary of the trained SentencePiece tokenizer.
  """

  path: str | None = None
  tokenizer: str | None = None
  tokenizer_vocab_size: int = 512


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  """Metrics and rollout logging (section `logging`).

  Attributes:
    tensorboard: also write TensorBoard event files (tensorboardX).
    progress: "bar" (tqdm), "lines" (one plain line per RL step, per
      `warmstart.log_every` warm-start steps and per tenth of an
      evaluation), "off" (only errors and the final summary); None = bar
      when stdout is a terminal, lines otherwise. Process 0 only.
    progress_bar: the older switch, an alias: True = "bar", False =
      "lines" (no bar); None = unset.
    archive_rollouts: write rollouts to `rollouts/` (tensorstore).
    archive_every: archive every k-th step (a full BroRL step at 16k tokens
      is GBs).
    text_samples: decoded rollouts per step written to the JSONL sample.
    wandb: also log every metrics row (and the config) to Weights & Biases
      (`loop/wandb_writer.py`; the `[wandb]` extra). Process 0 only.
    wandb_project / wandb_entity / wandb_group / wandb_tags: the W&B run's
      project, team or user, group and tags (None / (): W&B's defaults).
    wandb_name: the run's display name; None = the workdir's name.
    wandb_mode: "online", "offline" (files under `W/wandb/`, `wandb sync`
      uploads them) or "disabled".
  """

  tensorboard: bool = True
  progress: str | None = None
  progress_bar: bool | None = None
  archive_rollouts: bool = True
  archive_every: int = 1
  text_samples: int = 4
  wandb: bool = False
  wandb_project: str | None = None
  wandb_entity: str | None = None
  wandb_name: str | None = None
  wandb_group: str | None = None
  wandb_tags: tuple[str, ...] = ()
  wandb_mode: str = "online"

  def __post_init__(self):
    check(self.archive_every >= 1, "logging.archive_every", "must be >= 1")
    check(self.text_samples >= 0, "logging.text_samples", "must be >= 0")
    check_choice(self.progress, "logging.progress",
                 (None, "bar", "lines", "off"))
    check(self.progress_bar in (None, True, False), "logging.progress_bar",
          f"must be True, False or None, got {self.progress_bar!r}")
    alias = {None: None, True: "bar", False: "lines"}[self.progress_bar]
    check(alias is None or self.progress in (None, alias),
          "logging.progress_bar",
          f"is an alias of logging.progress ({self.progress_bar} = "
          f"{alias!r}) and contradicts logging.progress={self.progress!r}; "
          "set only logging.progress")
    if self.progress is None:
      object.__setattr__(self, "progress", alias)
    # `--config.logging.wandb_tags=a,b` arrives as ("a,b",): split on commas.
    tags = ((self.wandb_tags,) if isinstance(self.wandb_tags, str)
            else tuple(self.wandb_tags))
    check(all(isinstance(t, str) for t in tags), "logging.wandb_tags",
          f"must be strings, got {self.wandb_tags!r}")
    object.__setattr__(self, "wandb_tags", tuple(
        t.strip() for tag in tags for t in tag.split(",") if t.strip()))
    check_choice(self.wandb_mode, "logging.wandb_mode", WANDB_MODES)

  def progress_mode(self) -> str:
    """"bar", "lines" or "off" (None resolved on stdout's terminal-ness)."""
    return progress_lib.resolve(self.progress)


@dataclasses.dataclass(frozen=True)
class RolloutSection:
  """`rollout` keys that belong to the loop, not the sampler.

  Attributes:
    prompts_per_step: P, prompts per RL step (global, all processes).
    allocation: "fixed" (every prompt gets `rollout.n` rollouts) or
      "adaptive" (`rl/allocation.py`: a probe of `probe_n` per prompt, then
      `budget` rows in all, water-filled by the coupling bound; `rollout.n`
      is then the most one prompt can get).
    budget: adaptive: rollout rows per step, probe included.
    probe_n: adaptive: first-round rollouts per prompt.
    allocation_floor: adaptive: the fewest rollouts a prompt ends with
      (all an all-correct or all-wrong probe gets while a mixed prompt can
      take more).
    allocation_block: adaptive: rollouts handed out at a time.
    param_dtype: dtype of the sampler's copy of the parameters, cast once
      in the train-to-sample reshard; None = `model.dtype` (the dtype every
      matmul casts to anyway: bf16 halves the f32 copy, f32 runs are
      unchanged).
  """

  prompts_per_step: int = 8
  allocation: str = "fixed"
  budget: int = 0
  probe_n: int = 4
  allocation_floor: int = 0
  allocation_block: int = 4
  param_dtype: str | None = None

  def __post_init__(self):
    check(self.prompts_per_step >= 1, "rollout.prompts_per_step",
          "must be >= 1")
    check_choice(self.allocation, "rollout.allocation", ALLOCATIONS)
    if self.param_dtype is not None:
      check_choice(self.param_dtype, "rollout.param_dtype", DTYPES)

  def sample_dtype(self, model: ModelConfig) -> str:
    """The sampling copy's dtype (`param_dtype`, else the compute dtype)."""
    return self.param_dtype or model.dtype


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every section, typed and validated. Built by `load`."""

  seed: int
  total_steps: int
  max_generated_tokens: int | None
  model: ModelConfig
  mesh: MeshConfig
  data: DataConfig
  rollout: SamplerConfig
  loop: RolloutSection
  rewards: RewardsConfig
  update: UpdateConfig
  advantage: AdvantageConfig
  loss: LossConfig
  shaping: ShapingConfig
  reference: ReferenceConfig
  optim: OptimConfig
  checkpoint: CheckpointConfig
  eval: EvalConfig
  diagnostics: DiagnosticsConfig
  warmstart: WarmstartConfig
  init: InitConfig
  logging: LoggingConfig
  raw: Mapping[str, Any] = dataclasses.field(compare=False, repr=False,
                                             default_factory=dict)

  def allocation(self) -> AllocationConfig | None:
    """The adaptive allocation's sizes (None: fixed N)."""
    loop = self.loop
    if loop.allocation == "fixed":
      return None
    return AllocationConfig(
        num_prompts=self.advantage.prompts_to_sample(loop.prompts_per_step),
        budget=loop.budget, probe_n=loop.probe_n,
        floor=loop.allocation_floor, block=loop.allocation_block,
        max_n=self.rollout.n)

  def eval_sampler(self) -> SamplerConfig:
    """The evaluation's SamplerConfig (eval settings over rollout's)."""
    e = self.eval
    return dataclasses.replace(
        self.rollout, n=e.n, temperature=e.temperature, top_p=e.top_p,
        top_k=e.top_k, greedy=e.greedy, early_stop=True,
        max_new_tokens=e.max_new_tokens or self.rollout.max_new_tokens,
        max_decode_rows=e.max_decode_rows or self.rollout.max_decode_rows,
        section="eval")


def _split(section: Mapping[str, Any], keys: Iterable[str]):
  section = dict(section or {})
  keys = set(keys)
  return ({k: v for k, v in section.items() if k in keys},
          {k: v for k, v in section.items() if k not in keys})


TOP_LEVEL = ("seed", "total_steps", "max_generated_tokens", "model", "mesh",
             "data", "rollout", "rewards", "algo", "optim", "checkpoint",
             "eval", "diagnostics", "warmstart", "init", "logging")


def load(config: Any) -> RunConfig:
  """Validates a whole ConfigDict into a `RunConfig` before anything runs.

  Raises:
    ConfigError: naming the first bad key and what is allowed.
  """

  raw = to_dict(config)
  unknown = sorted(set(raw) - set(TOP_LEVEL))
  if unknown:
    raise unknown_key_error(unknown[0], TOP_LEVEL)
  check(isinstance(raw.get("seed", 0), int), "seed", "must be an integer")
  total_steps = raw.get("total_steps", 0)
  check(isinstance(total_steps, int) and total_steps >= 0, "total_steps",
        f"must be an integer >= 0, got {total_steps!r}")
  budget = raw.get("max_generated_tokens")
  check(budget is None or (isinstance(budget, int) and budget > 0),
        "max_generated_tokens",
        f"must be a positive token count or None, got {budget!r}")

  model_section = dict(raw.get("model") or {})
  preset = model_section.pop("preset", None)
  loop_keys, sampler_keys = _split(raw.get("rollout"), [
      f.name for f in dataclasses.fields(RolloutSection)])
  algo = dict(raw.get("algo") or {})
  nested = {name: algo.pop(name, None) for name in
            ("advantage", "loss", "shaping", "reference")}
  eval_section = dict(raw.get("eval") or {})
  if "k" in eval_section and isinstance(eval_section["k"], (int, str)):
    eval_section["k"] = tuple(int(x) for x in str(eval_section["k"]).split(
        ","))
  cfg = RunConfig(
      seed=raw.get("seed", 0), total_steps=total_steps,
      max_generated_tokens=budget,
      model=model_config(preset, model_section),
      mesh=from_mapping(MeshConfig, raw.get("mesh"), "mesh"),
      data=from_mapping(DataConfig, raw.get("data"), "data"),
      rollout=from_mapping(SamplerConfig, sampler_keys, "rollout"),
      loop=from_mapping(RolloutSection, loop_keys, "rollout"),
      rewards=RewardsConfig.from_mapping(raw.get("rewards")),
      update=from_mapping(UpdateConfig, algo, "algo"),
      advantage=from_mapping(AdvantageConfig, nested["advantage"],
                             "algo.advantage"),
      loss=from_mapping(LossConfig, nested["loss"], "algo.loss"),
      shaping=from_mapping(ShapingConfig, nested["shaping"], "algo.shaping"),
      reference=from_mapping(ReferenceConfig, nested["reference"],
                             "algo.reference"),
      optim=from_mapping(OptimConfig, raw.get("optim"), "optim"),
      checkpoint=from_mapping(CheckpointConfig, raw.get("checkpoint"),
                              "checkpoint"),
      eval=from_mapping(EvalConfig, eval_section, "eval"),
      diagnostics=from_mapping(DiagnosticsConfig, raw.get("diagnostics"),
                               "diagnostics"),
      warmstart=from_mapping(WarmstartConfig, raw.get("warmstart"),
                             "warmstart"),
      init=from_mapping(InitConfig, raw.get("init"), "init"),
      logging=from_mapping(LoggingConfig, raw.get("logging"), "logging"),
      raw=raw)
  # Reward plugins register their verifiers before any verifier name is
  # checked: below, in the data files' rows and in the pool's workers.
  plugins_lib.load(cfg.rewards.plugins)
  _check_verifiers(cfg.data)
  if cfg.allocation() is not None:       # validates the adaptive sizes
    check(cfg.rollout.refill, "rollout.refill",
          "must be True with rollout.allocation='adaptive': unequal groups "
          "are decoded from per-prompt queues (fixed chunks cannot hold "
          "them)")
  return cfg


def _check_verifiers(data: DataConfig) -> None:
  """The verifier names the config gives are registered ones."""
  known = sorted(registry.VERIFIERS)
  check(data.default_verifier is None
        or data.default_verifier in registry.VERIFIERS,
        "data.default_verifier", f"unknown verifier "
        f"{data.default_verifier!r}; registered: {', '.join(known)} (a "
        "plugin in rewards.plugins may register more)")
  for split in ("train_files", "eval_files"):
    for spec in getattr(data, split):
      check(spec.verifier is None or spec.verifier in registry.VERIFIERS,
            f"data.{split}", f"{spec.path}: unknown verifier "
            f"{spec.verifier!r}; registered: {', '.join(known)} (a plugin "
            "in rewards.plugins may register more)")


def _keys(section: Any) -> dict[str, Any]:
  """A stage config's config keys and values (nested dataclasses as dicts)."""
  return {f.name: (_keys(v) if dataclasses.is_dataclass(v := getattr(
      section, f.name)) else v) for f in config_fields(type(section))}


def resolved(cfg: RunConfig) -> dict[str, Any]:
  """The config as the run uses it, in the config file's key layout.

  The inverse of `load`: presets expanded, derived values filled in (e.g.
  `rewards.code.time_budget_s`), every key present; `load(resolved(cfg))`
  gives `cfg` back.
  """
  return {
      "seed": cfg.seed, "total_steps": cfg.total_steps,
      "max_generated_tokens": cfg.max_generated_tokens,
      "model": {"preset": dict(cfg.raw.get("model") or {}).get("preset"),
                **_keys(cfg.model)},
      "mesh": _keys(cfg.mesh), "data": _keys(cfg.data),
      "rollout": {**_keys(cfg.loop), **_keys(cfg.rollout)},
      "rewards": _keys(cfg.rewards),
      "algo": {**_keys(cfg.update), "advantage": _keys(cfg.advantage),
               "loss": _keys(cfg.loss), "shaping": _keys(cfg.shaping),
               "reference": _keys(cfg.reference)},
      "optim": _keys(cfg.optim), "checkpoint": _keys(cfg.checkpoint),
      "eval": _keys(cfg.eval), "diagnostics": _keys(cfg.diagnostics),
      "warmstart": _keys(cfg.warmstart), "init": _keys(cfg.init),
      "logging": _keys(cfg.logging),
  }


def dumps(cfg: RunConfig) -> str:
  """`resolved(cfg)` one `key = value` line per key (`--print_config`).

  Keys are dotted and values Python literals, as `--config.KEY=VALUE`
  overrides spell them.
  """
  def lines(tree: Mapping[str, Any], prefix: str) -> Iterable[str]:
    for name, value in tree.items():
      if isinstance(value, Mapping) and not (prefix == "data."
                                             and name == "synthetic"):
        yield from lines(value, f"{prefix}{name}.")
      else:
        yield f"{prefix}{name} = {value!r}"
  return "\n".join(lines(resolved(cfg), ""))
