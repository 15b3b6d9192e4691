"""Sampler benchmark: `python -m brorl_jax.bench sampler [--json PATH]`.

All measurements in one run, on the same weights (a random `demo`-preset
model exported through the HF path and loaded by both sides), the same
prompts and sampling settings (temperature 1, no top-k/top-p), a fixed
number of new tokens (early stop off) and prefill included in every timing:

  * brorl vs transformers `generate` (torch CPU, KV cache, num_return_sequences
    = N) at N = 64, P = 1, prompt 64, 64 new tokens -> `hf_ratio_n64`;
  * tokens/s for N in {16, 64, 512} with P x N = 512 -> `scaling_ratio_512_16`,
    with each run's prefill timed alone: P x N rows decode the same tokens at
    any N, so the prefill of P prompts is all that sharing can save here
    (`scaling_bound_512_16`, the ratio if decoding cost the same at both N);
  * KV-cache bytes at N = 512, prompt 256, response 64 against a cache that
    repeats the prompt G times -> `kv_ratio_512` (and at response 1024);
  * per-step decode time over the first 64 tokens (N = 64, P = 1) with
    `max_new_tokens` = 4096 over the same with 128 -> `length_aware_ratio`
    (1 when a step reads only the KV written so far; the platform's default
    `model.attention_backend`, and the reference backend for comparison;
    best of 3 x reps, a step being a difference of two short timings).
  * skewed lengths: T = 1024, 64 slots, each rollout stopping at a length
    drawn lognormal (sigma 0.8, mean 0.2 T, 2 % capped at T; seed 0; the
    bench's stop rule, `length_limits`), at P = 1, N = 512 and P = 8,
    N = 64: the refill decode against fixed chunks of 64 rows, useful tokens/s
    -> `refill_speedup_skewed`; the refill's share of slot-steps that made a
    token -> `slot_utilization_skewed`, against what an event simulation of
    the same lengths and pools reaches -> `slot_utilization_bound_skewed`
    (each the worse of the two shapes). One repetition, after a compile
    run in which one rollout runs to T and the others stop at 2 tokens (so
    the refill's suffix widths are all compiled, `rollout/refill.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import tempfile
import time

import jax
import numpy as np

from brorl_jax import hf
from brorl_jax.model.config import model_config
from brorl_jax.model.transformer import Policy
from brorl_jax.rollout import Sampler, SamplerConfig
from brorl_jax.model.attention_kernels import resolve_attention_backend
from brorl_jax.rollout.sampler import refill_plan
from brorl_jax.rollout.slots import simulate_pools, skewed_lengths

NO_STOP = (2**30,)  # a stop id no model emits: every row runs to T tokens


def _time_interleaved(fns: dict, reps: int) -> dict[str, float]:
  """Best-of-reps seconds per function, timed in interleaved rounds.

  Interleaving (A B C A B C ...) keeps drifts in machine load from favouring
  whichever configuration happened to run in a quiet moment.
  """
  for fn in fns.values():
    fn()  # compile / warm up
  best = {k: float("inf") for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      best[k] = min(best[k], time.perf_counter() - t0)
  return best


def _brorl(policy, params, prompts, n, new_tokens, prefill_only=False):
  """A closure that samples n rollouts of each prompt, blocking.

  With `prefill_only` it runs just the prompts' prefill (the part of a
  sampling call whose cost depends on P, not on P x N).
  """
  cfg = SamplerConfig(n=n, max_prompt_len=prompts.shape[1],
                      max_new_tokens=new_tokens, early_stop=False,
                      max_decode_rows=prompts.shape[0] * n)
  sampler = Sampler(policy, cfg, stop_ids=NO_STOP, pad_id=0)
  lengths = np.full((prompts.shape[0],), prompts.shape[1], np.int32)
  keys = iter(range(10**6))

  def go():
    if prefill_only:
      jax.block_until_ready(sampler.prefill(params, prompts, lengths).logits)
      return
    out = sampler.generate(params, prompts, lengths,
                           jax.random.key(next(keys)))
    jax.block_until_ready(out.tokens)
  return go


def _hf_generate(hf_dir, prompts, n, new_tokens, threads):
  """A closure running transformers' generate the same way, blocking."""
  # Imported here: torch and transformers are optional (the `test` extra).
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir).eval()
  ids = torch.from_numpy(prompts.astype(np.int64))

  def go():
    with torch.no_grad():
      model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                     temperature=1.0, top_k=0, top_p=1.0,
                     num_return_sequences=n, max_new_tokens=new_tokens,
                     min_new_tokens=new_tokens, use_cache=True,
                     eos_token_id=None, pad_token_id=0)
  return go


def _decode_steps(policy, params, prompts, n, buffer, steps):
  """A closure decoding `steps` tokens of n rollouts in `buffer` slots.

  The prefill runs once here, outside the timed closure.
  """
  cfg = SamplerConfig(n=n, max_prompt_len=prompts.shape[1],
                      max_new_tokens=buffer, early_stop=False,
                      max_decode_rows=prompts.shape[0] * n)
  sampler = Sampler(policy, cfg, stop_ids=NO_STOP, pad_id=0)
  prefill = sampler.prefill(params, prompts, np.full(
      (prompts.shape[0],), prompts.shape[1], np.int32))
  keys = iter(range(10**6))

  def go():
    outs = list(sampler.chunks(params, prefill, jax.random.key(next(keys)),
                               steps=steps))
    jax.block_until_ready([o["tokens"] for _, _, o in outs])
  return go


def length_aware(mcfg, params, prompt, reps, steps=64,
                 buffers=(128, 4096)) -> dict:
  """Per-step decode seconds over the first `steps` tokens per buffer size.

  A step's time is (time of `steps` + 1 tokens - time of 1 token) / steps:
  the difference drops what a call spends once (zeroing the buffers,
  sampling the first token from the prefill's logits).
  """
  need = prompt.shape[1] + max(buffers)
  mcfg = mcfg.replace(max_position_embeddings=max(
      mcfg.max_position_embeddings, need))
  policy = Policy.create(mcfg)
  fns = {(b, s): _decode_steps(policy, params, prompt, 64, b, s)
         for b in buffers for s in (1, steps + 1)}
  sec = _time_interleaved(fns, reps)
  per_step = {b: (sec[(b, steps + 1)] - sec[(b, 1)]) / steps
              for b in buffers}
  lo, hi = min(buffers), max(buffers)
  return {"backend": mcfg.attention_backend,
          "decode_backend": resolve_attention_backend(
              mcfg.attention_backend, jax.devices()[0].platform),
          "per_step_ms": {str(b): 1e3 * t for b, t in per_step.items()},
          "ratio": per_step[hi] / per_step[lo]}


def kv_bytes(cfg, prompts: int, group: int, prompt_len: int,
             response_len: int) -> dict[str, int]:
  """Bytes of the KV arrays the sampler allocates, and of a repeated cache.

  Ours: the prefill's per-prompt KV ([P, Lp, K, H] k and v per layer, read
  off the arrays a real prefill returns) plus the decode loop's per-rollout
  suffix ([P, G, T, K, H] per layer, the loop state's shapes).
  """
  per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * \
      np.dtype(cfg.dtype).itemsize
  return {"shared_prefix": per_token * (prompts * prompt_len +
                                        prompts * group * response_len),
          "repeated": per_token * prompts * group * (prompt_len +
                                                     response_len)}


def skewed(policy, params, rng, prompt_len: int, t_max: int = 1024,
           slots: int = 64, segment_steps: int = 256) -> dict:
  """Refill vs fixed chunks on skewed lengths at two shapes (one rep)."""
  out = {}
  for p, n in ((1, 512), (8, 64)):
    prompts = rng.integers(3, policy.cfg.vocab_size, (p, prompt_len)
                           ).astype(np.int32)
    plen = np.full((p,), prompt_len, np.int32)
    limits = skewed_lengths(rng, (p, n), t_max)
    useful = int(limits.sum())
    res = {"prompts": p, "n": n, "useful_tokens": useful,
           "mean_length": float(limits.mean()),
           "capped": int((limits == t_max).sum())}
    for name, refill in (("fixed", False), ("refill", True)):
      cfg = SamplerConfig(n=n, max_prompt_len=prompt_len,
                          max_new_tokens=t_max, max_decode_rows=slots,
                          refill=refill, segment_steps=segment_steps)
      sampler = Sampler(policy, cfg, stop_ids=NO_STOP, pad_id=0)
      # Warm-up: one rollout runs to T, so every program of either sampler
      # is compiled before the timed run (the refill's suffix widths too).
      warm_limits = np.full((p, n), 2, np.int32)
      warm_limits[0, 0] = t_max
      warm = sampler.generate(params, prompts, plen, jax.random.key(0),
                              length_limits=warm_limits)
      jax.block_until_ready(warm.tokens)
      t0 = time.perf_counter()
      ro = sampler.generate(params, prompts, plen, jax.random.key(1),
                            length_limits=limits)
      jax.block_until_ready(ro.tokens)
      sec = time.perf_counter() - t0
      assert (np.asarray(ro.lengths) == limits).all(), "stop rule not kept"
      total = int(ro.total_slots)
      res[name] = {"seconds": sec, "useful_tokens_per_s": useful / sec,
                   "slot_steps": total,
                   "slot_utilization": 1 - int(ro.finished_slots) / total}
    sim = simulate_pools(limits, refill_plan(p, n, slots)[1])
    res["slot_utilization_bound"] = sim["utilization"]
    res["refill_speedup"] = (res["refill"]["useful_tokens_per_s"] /
                             res["fixed"]["useful_tokens_per_s"])
    out[f"P{p}_N{n}"] = res
  return out


def main(argv: list[str]) -> dict:
  parser = argparse.ArgumentParser(prog="python -m brorl_jax.bench sampler")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--preset", default="demo")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--prompt_len", "--prompt-len", type=int, default=64)
  parser.add_argument("--new_tokens", "--new-tokens", type=int, default=64)
  parser.add_argument("--skewed_new_tokens", "--skewed-new-tokens", type=int,
                      default=1024,
                      help="T of the skewed-length workload (0 = skip it)")
  parser.add_argument("--long_prompt_len", "--long-prompt-len", type=int,
                      default=1024,
                      help="prompt length of the extra N = 512 : 16 "
                           "comparison (0 = skip it)")
  args = parser.parse_args(argv)
  threads = os.cpu_count() or 1  # torch gets every core, as XLA does

  mcfg = model_config(args.preset)
  policy = Policy.create(mcfg)
  rng = np.random.default_rng(0)
  results: dict = {"preset": args.preset, "model": dataclasses.asdict(mcfg),
                   "device": str(jax.devices()[0].platform),
                   "settings": {"temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                "prompt_len": args.prompt_len,
                                "new_tokens": args.new_tokens,
                                "early_stop": False, "reps": args.reps,
                                "timing": "best of reps, prefill included"}}
  # Wall seconds of each part, compiles included (the whole bench has a
  # time bar: README, sampler section).
  parts: dict[str, float] = {}
  results["part_seconds"] = parts
  mark = [time.perf_counter()]

  def lap(name):
    now = time.perf_counter()
    parts[name], mark[0] = now - mark[0], now
    print(f"{name}: {parts[name]:.0f} s", flush=True)

  with tempfile.TemporaryDirectory() as tmp:
    # Same weights on both sides: export through the HF path, import back.
    hf.save_hf(policy.init(jax.random.key(0)), mcfg, pathlib.Path(tmp) / "hf")
    params = hf.load_hf_params(pathlib.Path(tmp) / "hf", mcfg)
    lp, t = args.prompt_len, args.new_tokens
    prompt1 = rng.integers(3, mcfg.vocab_size, (1, lp)).astype(np.int32)

    # 1. brorl vs transformers generate, N = 64, P = 1.
    times = _time_interleaved(
        {"brorl": _brorl(policy, params, prompt1, 64, t),
         "hf": _hf_generate(pathlib.Path(tmp) / "hf", prompt1, 64, t,
                            threads)}, args.reps)
    ours, theirs = times["brorl"], times["hf"]
    results["hf_n64"] = {"brorl_tokens_per_s": 64 * t / ours,
                         "hf_tokens_per_s": 64 * t / theirs,
                         "brorl_s": ours, "hf_s": theirs}
    results["hf_ratio_n64"] = theirs / ours
    lap("hf_n64")

  # 2. Length-aware decode: per-step cost at two buffer sizes, for the
  # platform's default backend and for the reference (every slot read).
  # A step is a difference of two short timings (~0.3 s): 3x the reps (on
  # a quiet machine the ratio read 1.02-1.43 over runs with 3 reps and
  # 1.19-1.21 with 9).
  aware = {name: length_aware(mcfg.replace(attention_backend=name), params,
                              prompt1, 3 * args.reps)
           for name in ("auto", "reference")}
  results["length_aware"] = aware
  results["length_aware_ratio"] = aware["auto"]["ratio"]
  lap("length_aware")

  # 3. Scaling with the group size at a fixed P x N = 512 rows.
  prompts = {n: rng.integers(3, mcfg.vocab_size, (512 // n, lp)).astype(
      np.int32) for n in (16, 64, 512)}
  fns = {n: _brorl(policy, params, prompts[n], n, t) for n in prompts}
  fns.update({(n, "prefill"): _brorl(policy, params, prompts[n], n, t,
                                     prefill_only=True) for n in prompts})
  sec = _time_interleaved(fns, args.reps)
  scaling = {str(n): {"prompts": 512 // n, "seconds": sec[n],
                      "tokens_per_s": 512 * t / sec[n],
                      "prefill_s": sec[(n, "prefill")]} for n in prompts}
  results["scaling"] = scaling
  results["scaling_ratio_512_16"] = (scaling["512"]["tokens_per_s"] /
                                     scaling["16"]["tokens_per_s"])
  # What sharing the prompt can save at this shape: P x N rows decode the
  # same tokens at any N, so only the prefill (P prompts) differs. Were
  # N = 16's decode exactly as fast as N = 512's, the ratio would be this.
  s16, s512 = scaling["16"], scaling["512"]
  results["scaling_bound_512_16"] = s16["seconds"] / (
      s16["seconds"] - s16["prefill_s"] + s512["prefill_s"])
  lap("scaling")

  # The same comparison at long prompts (no target): there the P prompts'
  # prefill, which sharing does once per prompt, is a large share of a
  # sampling call.
  long_lp = args.long_prompt_len
  if long_lp:
    fns = {n: _brorl(policy, params, rng.integers(
        3, mcfg.vocab_size, (512 // n, long_lp)).astype(np.int32), n, t)
           for n in (16, 512)}
    sec = _time_interleaved(fns, args.reps)
    results["scaling_long_prompt"] = {
        "prompt_len": long_lp,
        **{str(n): {"prompts": 512 // n, "seconds": sec[n],
                    "tokens_per_s": 512 * t / sec[n]} for n in fns},
        "ratio_512_16": sec[16] / sec[512]}
    lap("scaling_long_prompt")

  # 4. KV bytes: shared prefix vs a prompt repeated G times.
  kv = {}
  for response in (64, 1024):
    b = kv_bytes(mcfg, 1, 512, 256, response)
    kv[str(response)] = dict(b, ratio=b["shared_prefix"] / b["repeated"])
  # Cross-check the formula against the arrays a real prefill allocates.
  sampler = Sampler(policy, SamplerConfig(n=512, max_prompt_len=256,
                                          max_new_tokens=64),
                    stop_ids=NO_STOP, pad_id=0)
  pre = sampler.prefill(params, np.ones((1, 256), np.int32),
                        np.full((1,), 256, np.int32))
  prefix_bytes = sum(x.nbytes for x in pre.k + pre.v)
  assert prefix_bytes == kv_bytes(mcfg, 1, 0, 256, 0)["shared_prefix"]
  results["kv_bytes"] = kv
  results["kv_ratio_512"] = kv["64"]["ratio"]
  lap("kv_bytes")
  results["targets"] = {"hf_ratio_n64": ">= 3", "scaling_ratio_512_16":
                        ">= 1.5", "kv_ratio_512": "<= 0.3",
                        "length_aware_ratio": "<= 1.3"}

  # 4. Skewed lengths: refilled slots vs fixed chunks.
  if args.skewed_new_tokens:
    sk = skewed(policy, params, rng, lp, args.skewed_new_tokens)
    results["skewed"] = sk
    results["refill_speedup_skewed"] = min(s["refill_speedup"]
                                           for s in sk.values())
    worst = min(sk.values(), key=lambda s: s["refill"]["slot_utilization"] /
                s["slot_utilization_bound"])
    results["slot_utilization_skewed"] = worst["refill"]["slot_utilization"]
    results["slot_utilization_bound_skewed"] = worst["slot_utilization_bound"]
    results["targets"].update({
        "refill_speedup_skewed": ">= 2.5",
        "slot_utilization_skewed": ">= 0.9 x slot_utilization_bound_skewed"})
    lap("skewed")
  parts["total"] = sum(parts.values())

  print(f"brorl vs transformers generate (N=64, P=1): "
        f"{results['hf_n64']['brorl_tokens_per_s']:.0f} vs "
        f"{results['hf_n64']['hf_tokens_per_s']:.0f} tokens/s -> "
        f"hf_ratio_n64 = {results['hf_ratio_n64']:.2f}")
  for name, a in aware.items():
    ms = a["per_step_ms"]
    print(f"decode step, first 64 tokens, backend {name}: "
          f"{ms['128']:.2f} ms at 128 slots, {ms['4096']:.2f} ms at 4096 -> "
          f"ratio {a['ratio']:.2f}")
  print(f"length_aware_ratio = {results['length_aware_ratio']:.2f}")
  for n, s in scaling.items():
    print(f"N={n:>3} P={s['prompts']:>2}: {s['tokens_per_s']:.0f} tokens/s")
  print(f"scaling_ratio_512_16 = {results['scaling_ratio_512_16']:.2f} "
        f"(prefill-only bound at this shape: "
        f"{results['scaling_bound_512_16']:.2f})")
  if long_lp:
    sl = results["scaling_long_prompt"]
    print(f"at prompt {long_lp}: N=16 {sl['16']['tokens_per_s']:.0f}, "
          f"N=512 {sl['512']['tokens_per_s']:.0f} tokens/s -> ratio "
          f"{sl['ratio_512_16']:.2f} (no target)")
  for r, k in kv.items():
    print(f"KV bytes N=512 prompt 256 response {r}: {k['shared_prefix']:,} "
          f"vs repeated {k['repeated']:,} -> ratio {k['ratio']:.3f}")
  if args.skewed_new_tokens:
    for shape, s in results["skewed"].items():
      print(f"skewed {shape} (mean {s['mean_length']:.0f} of "
            f"T={args.skewed_new_tokens}, {s['capped']} capped): refill "
            f"{s['refill']['useful_tokens_per_s']:.0f} vs fixed "
            f"{s['fixed']['useful_tokens_per_s']:.0f} useful tokens/s -> "
            f"x{s['refill_speedup']:.2f}; slot utilization "
            f"{s['refill']['slot_utilization']:.3f} (fixed "
            f"{s['fixed']['slot_utilization']:.3f}, simulated bound "
            f"{s['slot_utilization_bound']:.3f})")
    print(f"refill_speedup_skewed = {results['refill_speedup_skewed']:.2f}, "
          f"slot_utilization_skewed = "
          f"{results['slot_utilization_skewed']:.3f} (bound "
          f"{results['slot_utilization_bound_skewed']:.3f})")
  print("part seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                      parts.items()))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
  return results
