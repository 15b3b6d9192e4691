"""The prompt pipeline: records -> chat template -> tokens -> PromptBatch.

Built once per run (`PromptPipeline`): every file is read and validated
(`records.py`), each record is rendered (system prompt, instruction suffix,
chat template) and tokenized, and prompts longer than `max_prompt_len` are
dropped and counted, never truncated. All of this happens before the first
batch, so the counts are exact and every process sees the same prompt set.

Training order (a grain `MapDataset`, so any position is computed directly
and resuming costs nothing):

* one file: shuffled with `data.seed`, a new permutation each epoch
  (numpy's PCG64 seeded with (seed, file, epoch)), `num_epochs` passes
  (None: forever);
* several files: each shuffled and repeated forever, interleaved by weight
  (`grain.MapDataset.mix`; default weight = the file's size); with
  `num_epochs` the stream holds `num_epochs` x (total prompts) items.

The stream is cut into global batches of `prompts_per_step` prompts (a last
partial batch is dropped) and process `i` of `n` takes rows
`[i * P / n, (i + 1) * P / n)` of each, the rows that
`jax.make_array_from_process_local_data` places on it. So global batch k is
the same for any process count.

`train_iterator()` returns grain's `DatasetIterator`: `get_state()` /
`set_state()`, and orbax saves it with
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)`.

Eval (`eval_batches()`): every eval record exactly once, in file order, in
batches of the same static shape; the last global batch is filled up with
copies of real prompts marked `valid == False` (never returned shorter), so
nothing recompiles and all processes run the same number of batches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import grain
import numpy as np

from brorl_jax import config as config_lib
from brorl_jax.data import records as records_lib
from brorl_jax.data import tasks
from brorl_jax.data import tokenizer as tokenizer_lib
from brorl_jax.data.columns import Columns

_log = logging.getLogger(__name__)
FileSpec = records_lib.FileSpec


def _file_specs(value, key: str) -> tuple[FileSpec, ...]:
  if isinstance(value, (str, FileSpec)) or hasattr(value, "keys"):
    value = [value]
  specs = []
  for spec in value or ():
    if hasattr(spec, "to_dict"):  # an ml_collections ConfigDict entry
      spec = spec.to_dict()
    try:
      specs.append(FileSpec.parse(spec))
    except (TypeError, ValueError) as e:
      config_lib.check(False, key, str(e))
    config_lib.check(specs[-1].weight is None or specs[-1].weight > 0, key,
                     f"weight of {specs[-1].path} must be > 0")
    config_lib.check(specs[-1].max_prompts is None
                     or specs[-1].max_prompts >= 1, key,
                     f"max_prompts of {specs[-1].path} must be >= 1")
  return tuple(specs)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Config section `data`.

  Attributes:
    train_files: training files: paths, or `{"path", "weight"?, "task"?,
      "verifier"?}` mappings (`records.FileSpec`). A path may be a JSONL
      or Parquet file, a `datasets` `save_to_disk` directory (`DIR:SPLIT`
      for a DatasetDict) or `hf:NAME[:CONFIG]@SPLIT` (`hf_datasets.py`).
    eval_files: evaluation files, same form (weights unused).
    prompt_key: the column holding the prompt (text, or a list of
      messages) in every file (`columns.py`; dotted for nested columns).
    answer_key: the column holding the reference answer.
    verifier_key: the column naming a row's verifier.
    default_verifier: the verifier of rows that name none (after the
      file entry's own `verifier`); None: every row must name one.
    skip_bad_rows: skip and count malformed rows instead of stopping.
    shuffle: shuffle training prompts (per file, reshuffled each epoch).
    seed: shuffle seed, in [0, 2**32).
    num_epochs: passes over the training prompts; None repeats forever.
    system_prompt: system message put first when a record has none
      (requires `apply_chat_template`).
    instruction: text appended verbatim to the (last) user message, e.g.
      " Let's think step by step and output the final answer within
      \\boxed{}." (note the leading space).
    apply_chat_template: render prompts with the tokenizer's chat template;
      False feeds `prompt + instruction` raw (base models; no `messages`).
    add_bos: prepend the tokenizer's bos id (templates usually write it).
    prefetch: training batches prepared ahead in a background thread; 0
      builds each on demand.
    synthetic: generate a synthetic task set into the workdir and use it
      (before `train_files` / `eval_files`): a mapping with `task`
      ("arithmetic" | "countdown"), `train` and `eval` record counts, `seed`
      and `difficulty` (list of levels). None = off.
  """

  train_files: tuple[FileSpec, ...] = ()
  eval_files: tuple[FileSpec, ...] = ()
  prompt_key: str = "prompt"
  answer_key: str = "answer"
  verifier_key: str = "verifier"
  default_verifier: str | None = None
  skip_bad_rows: bool = False
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = None
  system_prompt: str | None = None
  instruction: str = ""
  apply_chat_template: bool = True
  add_bos: bool = False
  prefetch: int = 0
  synthetic: Mapping[str, Any] | None = None

  def __post_init__(self):
    try:
      columns = Columns(self.prompt_key, self.answer_key, self.verifier_key)
    except ValueError as e:
      config_lib.check(False, "data.prompt_key", str(e))
    config_lib.check(
        self.default_verifier is None or (isinstance(
            self.default_verifier, str) and self.default_verifier),
        "data.default_verifier",
        f"must be a verifier name or None, got {self.default_verifier!r}")
    # Every file entry carries the column mapping (None: the field names)
    # and the default verifier, so each reader of a FileSpec applies them.
    columns = None if columns.identity else columns
    for split in ("train_files", "eval_files"):
      specs = _file_specs(getattr(self, split), f"data.{split}")
      # An entry that brings its own mapping (the benchmark suite's) keeps it.
      object.__setattr__(self, split, tuple(dataclasses.replace(
          s, columns=s.columns or columns,
          verifier=s.verifier or self.default_verifier) for s in specs))
    config_lib.check(0 <= self.seed < 2**32, "data.seed",
                     f"must be in [0, 2**32), got {self.seed}")
    config_lib.check(self.num_epochs is None or self.num_epochs >= 1,
                     "data.num_epochs",
                     f"must be None (forever) or >= 1, got {self.num_epochs}")
    if self.synthetic is not None:
      spec = dict(self.synthetic)
      allowed = {"task", "train", "eval", "seed", "difficulty"}
      unknown = sorted(set(spec) - allowed)
      config_lib.check(not unknown, f"data.synthetic.{unknown[0]}"
                       if unknown else "data.synthetic",
                       f"unknown key; known: {', '.join(sorted(allowed))}")
      config_lib.check_choice(spec.get("task"), "data.synthetic.task",
                              sorted(tasks.TASKS))
      config_lib.check(int(spec.get("train", 0)) >= 1,
                       "data.synthetic.train", "must be >= 1")
      object.__setattr__(self, "synthetic", spec)
    config_lib.check(self.prefetch >= 0, "data.prefetch",
                     f"must be >= 0, got {self.prefetch}")
    config_lib.check(
        self.apply_chat_template or self.system_prompt is None,
        "data.system_prompt",
        "needs data.apply_chat_template=True (raw prompts have no system "
        "turn)")


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """P prompts of one process, left-padded to a static length.

  Attributes:
    tokens: [P, Lp] int32 prompt ids, left-padded with the tokenizer's
      pad_id to Lp = max_prompt_len. pad_id may equal a real token (eos):
      use `lengths` / `mask()`, never `tokens == pad_id`.
    lengths: [P] int32 true prompt lengths (>= 1).
    valid: [P] bool; False marks eval filler rows (copies of real prompts
      that only complete the last batch); always True in training.
    records: the P host-side records (answers, verifiers, tasks, tests, meta),
      row-aligned with `tokens`.
  """

  tokens: np.ndarray  # [P, Lp] int32
  lengths: np.ndarray  # [P] int32
  valid: np.ndarray  # [P] bool
  records: tuple[records_lib.Record, ...]

  def mask(self) -> np.ndarray:
    """[P, Lp] bool, True on prompt tokens (from lengths, not from pad)."""
    lp = self.tokens.shape[1]
    return np.arange(lp)[None, :] >= (lp - self.lengths)[:, None]


@dataclasses.dataclass(frozen=True)
class FileStats:
  """What became of one file's rows.

  Attributes:
    path: the file.
    task: its default task name.
    rows: rows read.
    bad_rows: malformed rows skipped (`data.skip_bad_rows`).
    too_long: valid prompts dropped for exceeding `max_prompt_len` tokens.
    kept: prompts in the pipeline (= rows - bad_rows - too_long).
    longest: longest prompt seen, in tokens (kept or not).
  """

  path: str
  task: str
  rows: int
  bad_rows: int
  too_long: int
  kept: int
  longest: int


@dataclasses.dataclass
class _PromptSet:
  """Tokenized prompts of several files, addressed by one flat index."""

  records: list[records_lib.Record]
  tokens: list[np.ndarray]  # each [len] int32
  sizes: list[int]  # kept prompts per file, in file order
  stats: tuple[FileStats, ...]


class _EpochOrder:
  """Position in a file's repeated stream -> flat prompt index.

  Each epoch is a fresh permutation from (seed, file, epoch). This replaces
  `grain.MapDataset.shuffle`, whose index_shuffle costs ~4 ms per element on
  files of ~10 prompts (30-90 us at 1,000; measured with grain 0.2.18); one
  numpy permutation per epoch is O(n) once and then a lookup.
  """

  def __init__(self, size: int, offset: int, seed: int, file_index: int,
               shuffle: bool):
    self._size, self._offset = size, offset
    self._seed, self._file, self._shuffle = seed, file_index, shuffle
    self._cache: dict[int, np.ndarray] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    perm = self._cache.get(epoch)
    if perm is None:
      rng = np.random.default_rng([self._seed, self._file, epoch])
      perm = rng.permutation(self._size)
      # Keep two epochs (a batch may straddle a boundary); the dict is
      # replaced whole, so a prefetch thread never sees it half-updated.
      cache = {**self._cache, epoch: perm}
      self._cache = {e: cache[e] for e in sorted(cache)[-2:]}
    return perm

  def __call__(self, position: int, index_in_epoch: int) -> int:
    if not self._shuffle:
      return self._offset + index_in_epoch
    epoch = position // self._size
    return self._offset + int(self._permutation(epoch)[index_in_epoch])


class PromptPipeline:
  """Reads, renders, tokenizes and batches the prompts of a run."""

  def __init__(self, config: DataConfig,
               tokenizer: tokenizer_lib.Tokenizer, *,
               max_prompt_len: int, prompts_per_step: int,
               process_index: int = 0, process_count: int = 1,
               known_verifiers: Collection[str] | None = None):
    """Sets up the pipeline; files are read on first use of each split.

    Args:
      config: the `data` section.
      tokenizer: renders the chat template and tokenizes.
      max_prompt_len: Lp (`rollout.max_prompt_len`); longer prompts are
        dropped and counted.
      prompts_per_step: P over all processes (`rollout.prompts_per_step`);
        each process gets P / process_count rows per batch.
      process_index: this process (`jax.process_index()`).
      process_count: number of processes (`jax.process_count()`).
      known_verifiers: registered verifier names; a row naming another one
        is malformed. None skips the check.
    """
    config_lib.check(max_prompt_len >= 1, "rollout.max_prompt_len",
                     f"must be >= 1, got {max_prompt_len}")
    config_lib.check(
        prompts_per_step >= 1 and prompts_per_step % process_count == 0,
        "rollout.prompts_per_step",
        f"must be a positive multiple of the process count "
        f"{process_count}, got {prompts_per_step}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in "
                       f"[0, {process_count})")
    self.config = config
    self.tokenizer = tokenizer
    self.max_prompt_len = max_prompt_len
    self.prompts_per_step = prompts_per_step
    self.process_index = process_index
    self.process_count = process_count
    self.local_batch_size = prompts_per_step // process_count
    self._known_verifiers = (None if known_verifiers is None
                             else frozenset(known_verifiers))
    self._sets: dict[str, _PromptSet] = {}

  # -- prompt text and tokens ------------------------------------------------

  def prompt_text(self, record: records_lib.Record) -> str:
    """The text fed to the tokenizer for one record.

    Raises:
      ValueError: a `messages` record without `data.apply_chat_template`.
    """
    cfg = self.config
    if not cfg.apply_chat_template:
      if record.prompt is None:
        raise ValueError(
            "records with 'messages' need data.apply_chat_template=True")
      return record.prompt + cfg.instruction
    messages = ([dict(m) for m in record.messages] if record.messages
                else [{"role": "user", "content": record.prompt}])
    if cfg.instruction:
      users = [m for m in messages if m["role"] == "user"]
      target = users[-1] if users else messages[-1]
      target["content"] += cfg.instruction
    if cfg.system_prompt is not None and messages[0]["role"] != "system":
      messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return self.tokenizer.apply_chat_template(messages,
                                              add_generation_prompt=True)

  def _load(self, split: str) -> _PromptSet:
    if split in self._sets:
      return self._sets[split]
    specs = (self.config.train_files if split == "train"
             else self.config.eval_files)
    config_lib.check(bool(specs), f"data.{split}_files",
                     f"no {split} files configured")
    all_records, all_tokens, sizes, stats = [], [], [], []
    for spec in specs:
      result = records_lib.read_records(
          spec, skip_bad_rows=self.config.skip_bad_rows,
          known_verifiers=self._known_verifiers)
      try:
        texts = [self.prompt_text(r) for r in result.records]
      except ValueError as e:  # incl. templates.ChatTemplateError
        raise records_lib.DataError(result.path, None, None, str(e)) from e
      ids = self.tokenizer.encode_batch(texts, add_bos=self.config.add_bos)
      lengths = [len(x) for x in ids]
      fits = [i for i, n in enumerate(lengths)
              if 1 <= n <= self.max_prompt_len]
      kept = fits[:spec.max_prompts]
      stat = FileStats(
          path=result.path, task=result.task, rows=result.rows,
          bad_rows=result.bad_rows, too_long=len(result.records) - len(fits),
          kept=len(kept), longest=max(lengths))
      stats.append(stat)
      if stat.too_long:
        _log.warning("%s: dropped %d of %d prompts longer than "
                     "max_prompt_len=%d tokens (longest %d)", stat.path,
                     stat.too_long, len(result.records), self.max_prompt_len,
                     stat.longest)
      if not kept:
        raise records_lib.DataError(
            result.path, None, None,
            f"every prompt is longer than rollout.max_prompt_len="
            f"{self.max_prompt_len} tokens (longest {stat.longest}); raise it")
      all_records += [result.records[i] for i in kept]
      all_tokens += [np.asarray(ids[i], np.int32) for i in kept]
      sizes.append(len(kept))
      _log.info("%s split: %s: %d prompts kept", split, stat.path, stat.kept)
    self._sets[split] = _PromptSet(all_records, all_tokens, sizes,
                                   tuple(stats))
    return self._sets[split]

  # -- statistics --------------------------------------------------------------

  def file_stats(self, split: str = "train") -> tuple[FileStats, ...]:
    """Per-file counts of a split ("train" or "eval"); reads it if needed."""
    return self._load(split).stats

  def metrics(self) -> dict[str, int]:
    """Flat counts of the splits read so far, e.g. `data/train/too_long`."""
    out = {}
    for split, prompt_set in self._sets.items():
      for name in ("rows", "bad_rows", "too_long", "kept"):
        out[f"data/{split}/{name}"] = sum(
            getattr(s, name) for s in prompt_set.stats)
    return out

  # -- batches -----------------------------------------------------------------

  def _collate(self, prompt_set: _PromptSet, global_idx: np.ndarray,
               p: int, n_valid: int | None = None) -> PromptBatch:
    """This process's `p` rows of one global batch of prompt indices."""
    local = np.asarray(global_idx)[self.process_index * p:
                                   (self.process_index + 1) * p]
    valid = np.ones(p, bool) if n_valid is None else local < n_valid
    # Filler rows copy a real prompt of the same batch (or the first one):
    # a zero-length prompt would give the sampler no last position.
    filler = local[valid][0] if valid.any() else 0
    local = np.where(valid, local, filler)
    tokens = np.full((p, self.max_prompt_len), self.tokenizer.pad_id,
                     np.int32)
    lengths = np.zeros(p, np.int32)
    for row, i in enumerate(local):
      ids = prompt_set.tokens[i]
      tokens[row, self.max_prompt_len - len(ids):] = ids
      lengths[row] = len(ids)
    return PromptBatch(tokens=tokens, lengths=lengths, valid=valid,
                       records=tuple(prompt_set.records[i] for i in local))

  def train_dataset(self) -> grain.MapDataset:
    """A `grain.MapDataset` of this process's training `PromptBatch`es."""
    prompt_set = self._load("train")
    cfg = self.config
    offsets = np.cumsum([0] + prompt_set.sizes)
    single = len(prompt_set.sizes) == 1
    parts = []
    for i, size in enumerate(prompt_set.sizes):
      order = _EpochOrder(size, int(offsets[i]), cfg.seed, i, cfg.shuffle)
      part = grain.MapDataset.range(size).repeat(
          cfg.num_epochs if single else None)
      parts.append(part.map_with_index(order))
    if single:
      stream = parts[0]
    else:
      weights = [s.weight if s.weight is not None else n
                 for s, n in zip(cfg.train_files, prompt_set.sizes)]
      stream = grain.MapDataset.mix(parts, weights)
      if cfg.num_epochs is not None:
        stream = stream[:cfg.num_epochs * int(offsets[-1])]
    batches = stream.batch(self.prompts_per_step, drop_remainder=True)
    return batches.map(
        lambda idx: self._collate(prompt_set, idx, self.local_batch_size))

  def train_iterator(self) -> grain.DatasetIterator:
    """A checkpointable iterator over training batches (see module doc)."""
    threads = 1 if self.config.prefetch else 0
    read_options = grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=self.config.prefetch)
    return iter(self.train_dataset().to_iter_dataset(read_options))

  def num_eval_batches(self, batch_size: int | None = None) -> int:
    """Number of batches `eval_batches(batch_size)` yields."""
    batch_size = batch_size or self.prompts_per_step
    return math.ceil(len(self._load("eval").records) / batch_size)

  def eval_batches(self,
                   batch_size: int | None = None) -> Iterator[PromptBatch]:
    """Every eval prompt once, in file order (see module doc).

    Args:
      batch_size: global prompts per batch (a multiple of the process
        count); None uses `prompts_per_step`.

    Yields:
      This process's `PromptBatch` of each global batch; rows with
      `valid == False` are filler and must be ignored.
    """
    prompt_set = self._load("eval")
    batch_size = batch_size or self.prompts_per_step
    config_lib.check(batch_size % self.process_count == 0, "eval.batch_size",
                     f"must be a multiple of {self.process_count}")
    n = len(prompt_set.records)
    for b in range(self.num_eval_batches(batch_size)):
      idx = np.arange(b * batch_size, (b + 1) * batch_size)
      yield self._collate(prompt_set, idx, batch_size // self.process_count,
                          n_valid=n)
