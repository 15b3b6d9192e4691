"""The reward pool: verifier worker processes with per-item timeouts.

    with RewardPool(config) as pool:
      future = pool.submit(items)        # returns at once
      ...decode the next chunk...
      results = future.result()          # [VerifyResult], in input order

One dispatcher thread feeds workers small chunks of items (one pipe message
per chunk amortizes IPC) and reads back one result per item, so it knows
which item each worker is on and since when. An item that runs past
`rewards.timeout_s` gets `status="timeout"` and the default score; its
worker is killed (SIGTERM, SIGKILL after `kill_grace_s`) and replaced, and
the rest of its chunk goes back to the queue. A worker that dies gives its
current item `status="error"`. Workers are also replaced every
`recycle_every` items. Nothing a verifier does can hang the caller.

Workers are fresh interpreters (see `worker.py` for why not
`multiprocessing`): they never import JAX, and each has an address-space
limit and, optionally, its own CPU set.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import pathlib
import pickle
import subprocess
import sys
import threading
import time
from multiprocessing import connection
from typing import Any, Mapping, Sequence

from brorl_jax.rewards import code_verifier, registry, sandbox, stats
from brorl_jax.rewards.config import RewardsConfig
from brorl_jax.rewards.registry import VerifyItem, VerifyResult

_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
STARTUP_TIMEOUT_S = 120.0
_MAX_START_FAILURES = 3


class _Job:
  """One `submit` call: its future and its results so far."""

  def __init__(self, n: int):
    self.future: concurrent.futures.Future = concurrent.futures.Future()
    self.results: list[VerifyResult | None] = [None] * n
    self.remaining = n

  def put(self, index: int, result: VerifyResult) -> bool:
    """Stores one result; True when the job is complete."""
    self.results[index] = result
    self.remaining -= 1
    return self.remaining == 0


class _Worker:
  """The parent's handle on one worker process."""

  def __init__(self, pool: RewardPool):
    parent_r, child_w = os.pipe()
    child_r, parent_w = os.pipe()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "brorl_jax.rewards.worker", str(child_r),
         str(child_w), str(os.getpid())],
        pass_fds=(child_r, child_w), stdin=subprocess.DEVNULL,
        stdout=2, env=env, close_fds=True)  # stray prints go to stderr
    os.close(child_r)
    os.close(child_w)
    self.recv = connection.Connection(parent_r, writable=False)
    self.send = connection.Connection(parent_w, readable=False)
    self.state = "starting"        # starting | idle | busy | dying
    self.inflight: collections.deque = collections.deque()  # (job, i, item)
    self.since = time.monotonic()  # state change / current item start
    self.done = 0
    self.kill_at = math.inf
    self.told_sandbox = False      # sent the parent's sandbox decision
    self.info: dict[str, Any] = {}
    self.send.send({"sys_path": list(sys.path), "cpus": pool.cpus,
                    "memory_mb": pool.config.worker_memory_mb,
                    "plugins": pool.config.plugins})
    self.send.send((pool.config, pool.verifiers))

  def stop(self, now: float, grace: float, terminate: bool) -> None:
    """Asks the worker to exit (or SIGTERMs it); SIGKILL after `grace`."""
    self.state, self.kill_at = "dying", now + grace
    try:
      if terminate:
        self.proc.terminate()
      else:
        self.send.send(None)
    except (OSError, ValueError):
      pass

  def close_pipes(self) -> None:
    """Closes the parent's ends of the worker's pipes."""
    for conn in (self.recv, self.send):
      try:
        conn.close()
      except OSError:
        pass


class RewardPool:
  """Scores `VerifyItem`s in worker processes; see the module doc."""

  def __init__(self, config: RewardsConfig | None = None, *,
               num_workers: int | None = None,
               cpus: Sequence[int] | None = None,
               verifiers: Mapping[str, registry.Verifier] | None = None):
    """Starts the workers (asynchronously: see `wait_ready`).

    Args:
      config: the rewards config (defaults when None).
      num_workers: overrides `config.num_workers` (0: one per usable core).
      cpus: CPU ids the workers are pinned to (None: `config.worker_cpus`;
        empty: not pinned).
      verifiers: name -> verifier table (the registry when None).
    """
    self.config = config or RewardsConfig()
    n = self.config.num_workers if num_workers is None else num_workers
    self.num_workers = n or len(os.sched_getaffinity(0))
    cpus = self.config.worker_cpus if cpus is None else cpus
    self.cpus = sorted(cpus) if cpus else None
    self.verifiers = dict(verifiers or registry.VERIFIERS)
    for name, fn in self.verifiers.items():
      try:
        pickle.dumps(fn)
      except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise ValueError(
            f"verifier {name!r} cannot be sent to worker processes ({e}); "
            "define it at module level in an importable module") from None
    self._lock = threading.Lock()
    self._queue: collections.deque = collections.deque()  # (job, i, item)
    # Futures are resolved outside the lock: their callbacks may call us.
    self._resolved: list[tuple[concurrent.futures.Future, Any]] = []
    self._stats = stats.PoolStats()
    self._workers: list[_Worker] = []
    self._closing = False
    self._broken: str | None = None
    self._start_failures = 0
    self._wake_r, self._wake_w = os.pipe()
    os.set_blocking(self._wake_w, False)
    # The sandbox's self-test runs once, here, while the workers start; code
    # items wait for it in `submit` and the workers take its decision.
    self._sandbox: str | None = None
    self._code = [n for n, fn in self.verifiers.items()
                  if fn is code_verifier.verify_code]
    if self._code:
      threading.Thread(target=self._self_test, daemon=True,
                       name="sandbox-self-test").start()
    with self._lock:
      for _ in range(self.num_workers):
        self._workers.append(_Worker(self))
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name="reward-pool")
    self._thread.start()

  # ---------------------------------------------------------------- public

  def submit(self, items: Sequence[VerifyItem]) -> concurrent.futures.Future:
    """Queues items; the future gives their `VerifyResult`s in input order.

    Raises:
      KeyError: an item names an unknown verifier (lists the known ones).
      SandboxUnavailable: code items where no sandbox works.
      RuntimeError: the pool is closed or its workers cannot start.
    """
    items = list(items)
    names = {item.verifier for item in items}
    unknown = sorted(n for n in names if n not in self.verifiers)
    if unknown:
      raise KeyError(f"unknown verifier {unknown[0]!r}; registered verifiers:"
                     f" {', '.join(sorted(self.verifiers))}")
    if names.intersection(self._code):
      backend = sandbox.backend_for(self.config.code)  # refused: the fix
      with self._lock:
        self._sandbox = backend
    job = _Job(len(items))
    if not items:
      job.future.set_result([])
      return job.future
    with self._lock:
      if self._closing or self._broken:
        raise RuntimeError(f"reward pool is {self._broken or 'closed'}")
      self._queue.extend((job, i, item) for i, item in enumerate(items))
    self._wake()
    return job.future

  def score(self, items: Sequence[VerifyItem]) -> list[VerifyResult]:
    """Blocking `submit(items).result()`."""
    return self.submit(items).result()

  def stats(self) -> dict[str, float]:
    """Counters since the last `pop_stats` (flat names, for metrics)."""
    with self._lock:
      return self._stats.summary()

  def pop_stats(self) -> dict[str, float]:
    """`stats()`, then resets the counters (call once per train step)."""
    with self._lock:
      summary = self._stats.summary()
      self._stats = stats.PoolStats()
      return summary

  def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> bool:
    """Waits until every worker has started; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      with self._lock:
        if self._broken:
          raise RuntimeError(f"reward pool is {self._broken}")
        live = [w for w in self._workers if w.state != "dying"]
        if len(live) >= self.num_workers and all(
            w.state != "starting" for w in live):
          return True
      time.sleep(0.01)
    return False

  def worker_info(self) -> list[dict[str, Any]]:
    """pid, `jax_imported`, RLIMIT_AS and CPU set of each ready worker."""
    with self._lock:
      return [dict(w.info) for w in self._workers if w.info]

  def close(self) -> None:
    """Stops the workers; pending futures fail. Returns within seconds."""
    with self._lock:
      if self._closing:
        return
      self._closing = True
    self._wake()
    self._thread.join(timeout=self.config.kill_grace_s + 5.0)
    self._resolve()
    with self._lock:
      for worker in self._workers:  # only if the dispatcher could not
        if worker.proc.poll() is None:
          worker.proc.kill()

  def __enter__(self) -> RewardPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ------------------------------------------------------------ dispatcher

  def _self_test(self) -> None:
    try:
      sandbox.backend_for(self.config.code)
    except sandbox.SandboxUnavailable:
      pass  # `submit` raises it for the first code item

  def _wake(self) -> None:
    # Under the lock: the dispatcher closes the pipe when it stops, and a
    # closed descriptor's number may already belong to another file.
    with self._lock:
      if self._wake_w is None:
        return
      try:
        os.write(self._wake_w, b"x")
      except BlockingIOError:
        pass  # already awake

  def _run(self) -> None:
    try:
      while True:
        with self._lock:
          if self._closing:
            break
          self._step()
          wait_for = [w.recv for w in self._workers if w.state != "dying"]
          timeout = self._next_deadline() - time.monotonic()
        ready = connection.wait(wait_for + [self._wake_r],
                                timeout=max(0.0, min(timeout, 1.0)))
        if self._wake_r in ready:
          os.read(self._wake_r, 4096)
        with self._lock:
          for conn in ready:
            if conn is not self._wake_r:
              self._drain(next(w for w in self._workers if w.recv is conn))
        self._resolve()
    except BaseException as e:  # pylint: disable=broad-except
      with self._lock:
        self._broken = f"broken ({type(e).__name__}: {e})"
    finally:
      with self._lock:
        self._shutdown()
      os.close(self._wake_r)  # only this thread reads it
      self._resolve()

  def _resolve(self) -> None:
    with self._lock:
      resolved, self._resolved = self._resolved, []
    for future, outcome in resolved:
      if future.done():
        continue
      if isinstance(outcome, BaseException):
        future.set_exception(outcome)
      else:
        future.set_result(outcome)

  def _next_deadline(self) -> float:
    deadlines = [math.inf]
    for w in self._workers:
      if w.state == "busy":
        deadlines.append(w.since + self.config.timeout_s)
      elif w.state == "starting":
        deadlines.append(w.since + STARTUP_TIMEOUT_S)
      elif w.state == "dying":
        deadlines.append(w.kill_at)
    return min(deadlines)

  def _drain(self, worker: _Worker) -> None:
    """Handles every message `worker` has sent; notices its death."""
    try:
      while worker.recv.poll():
        message = worker.recv.recv()
        if message[0] == "ready":
          worker.state, worker.info = "idle", message[1]
          worker.since = time.monotonic()
          self._start_failures = 0
        elif message[0] == "result":
          _, _, reward, status, seconds, error = message
          job, index, item = worker.inflight.popleft()
          self._record(job, index, item, VerifyResult(reward, status, seconds,
                                                      error))
          worker.done += 1
          worker.since = time.monotonic()
          if not worker.inflight:
            worker.state = "idle"
        elif message[0] == "exiting":
          self._give_back(worker)
          worker.stop(time.monotonic(), self.config.kill_grace_s,
                      terminate=False)
          self._stats.restarts += 1
          return
    except (EOFError, OSError):
      self._died(worker)

  def _record(self, job: _Job, index: int, item: VerifyItem,
              result: VerifyResult) -> None:
    self._stats.add(item.verifier, result)
    if job.put(index, result):
      self._resolved.append((job.future, job.results))

  def _give_back(self, worker: _Worker) -> None:
    """Puts the worker's unfinished items back at the queue's front, in
    order (another worker takes them)."""
    self._queue.extendleft(reversed(worker.inflight))
    worker.inflight.clear()

  def _fail_current(self, worker: _Worker, now: float, status: str,
                    error: str) -> None:
    """The worker's current item scores the default (`status`: "error" or
    "timeout"), the worker counts as restarted, and its other items go back
    to the queue: the one sequence of a worker that died or timed out."""
    job, index, item = worker.inflight.popleft()
    self._record(job, index, item, VerifyResult(
        self.config.default_score, status, now - worker.since, error))
    self._stats.restarts += 1
    self._give_back(worker)

  def _died(self, worker: _Worker) -> None:
    try:
      code = worker.proc.wait(timeout=self.config.kill_grace_s)
    except subprocess.TimeoutExpired:
      worker.proc.kill()
      code = worker.proc.wait()
    now = time.monotonic()
    if worker.state == "starting":
      self._start_failures += 1
      if self._start_failures >= _MAX_START_FAILURES:
        self._broken = (f"broken: {_MAX_START_FAILURES} workers failed to "
                        f"start (exit code {code}; see stderr)")
    elif worker.inflight:
      self._fail_current(worker, now, "error",
                         f"worker died (exit code {code})")
    self._give_back(worker)
    worker.close_pipes()
    sandbox.remove_scratch(worker.proc.pid)
    self._workers.remove(worker)

  def _step(self) -> None:
    """Timeouts, kills, replacements, and new work for idle workers."""
    now = time.monotonic()
    grace = self.config.kill_grace_s
    for worker in list(self._workers):
      if worker.state == "busy" and now - worker.since > self.config.timeout_s:
        self._drain(worker)  # a result may be waiting in the pipe
      if worker not in self._workers:
        continue
      if worker.state == "busy" and now - worker.since > self.config.timeout_s:
        self._fail_current(worker, now, "timeout",
                           f"timed out after {self.config.timeout_s} s")
        worker.stop(now, grace, terminate=True)
      elif (worker.state == "starting"
            and now - worker.since > STARTUP_TIMEOUT_S):
        worker.stop(now, grace, terminate=True)
        self._start_failures += 1
      elif (worker.state == "idle" and self.config.recycle_every
            and worker.done >= self.config.recycle_every):
        worker.stop(now, grace, terminate=False)
        self._stats.recycled += 1
      if worker.state == "dying":
        if worker.proc.poll() is not None:
          worker.close_pipes()
          sandbox.remove_scratch(worker.proc.pid)
          self._workers.remove(worker)
        elif now >= worker.kill_at:
          worker.proc.kill()
    if self._start_failures >= _MAX_START_FAILURES and not self._broken:
      self._broken = "broken: workers failed to start (see stderr)"
    if self._broken:
      self._fail_pending(RuntimeError(f"reward pool is {self._broken}"))
      return
    live = sum(w.state != "dying" for w in self._workers)
    for _ in range(self.num_workers - live):
      self._workers.append(_Worker(self))
    self._assign()

  def _assign(self) -> None:
    idle = [w for w in self._workers if w.state == "idle"]
    live = max(1, sum(w.state in ("idle", "busy") for w in self._workers))
    for worker in idle:
      if not self._queue:
        return
      # Full chunks while the queue is long; smaller ones at its tail, so
      # that every worker gets a share.
      size = max(1, min(self.config.chunk_size,
                        math.ceil(len(self._queue) / live)))
      chunk = [self._queue.popleft() for _ in range(min(size,
                                                        len(self._queue)))]
      worker.inflight.extend(chunk)
      worker.state, worker.since = "busy", time.monotonic()
      try:
        if self._sandbox is not None and not worker.told_sandbox:
          worker.send.send(("sandbox", self.config.code, self._sandbox))
          worker.told_sandbox = True
        worker.send.send([(i, item) for i, (_, _, item) in enumerate(chunk)])
      except (OSError, ValueError):
        self._died(worker)

  def _fail_pending(self, error: Exception) -> None:
    jobs = {id(job): job for job, _, _ in self._queue}
    for worker in self._workers:
      jobs.update({id(job): job for job, _, _ in worker.inflight})
      worker.inflight.clear()
    self._queue.clear()
    self._resolved.extend((job.future, error) for job in jobs.values())

  def _shutdown(self) -> None:
    """Fails what is pending and stops every worker, within the grace."""
    self._closing = True
    self._fail_pending(RuntimeError("reward pool closed"))
    now = time.monotonic()
    for worker in self._workers:
      worker.stop(now, self.config.kill_grace_s,
                  terminate=worker.state != "idle")
    deadline = now + self.config.kill_grace_s
    for worker in self._workers:
      try:
        worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        worker.proc.kill()
        worker.proc.wait()
      worker.close_pipes()
      sandbox.remove_scratch(worker.proc.pid)
    self._workers.clear()
    os.close(self._wake_w)
    self._wake_w = None
