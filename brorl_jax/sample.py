"""Sample from a trained or imported policy with the in-mesh group sampler.

  python -m brorl_jax.sample (--workdir W | --hf_dir DIR) --prompt "..."
      [--prompt "..."] [--chat] [--n 8] [--greedy] [--max_new_tokens T]
      [--temperature 1.0] [--top_p 1.0] [--top_k 0] [--step S] [--json P]

Dashed spellings (`--hf-dir`, `--max-new-tokens`, ...) are aliases.

`--prompt` is raw text; `--chat` renders it as a user turn with the
tokenizer's chat template first. Prints the completions, or writes
`{"completions": [[G strings] per prompt], "tokens": [[[ids] per rollout]
per prompt], "logprobs": [[[floats]]], "lengths", "stopped", ...}` with
`--json`.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import numpy as np

from brorl_jax import checkpointing, cli, hf
from brorl_jax.data import tokenizer_loader
from brorl_jax.loop.build import PolicySource, mesh_rules as make_rules
from brorl_jax.model.config import ATTENTION_BACKENDS
from brorl_jax.model.sharding import MeshRules, make_mesh
from brorl_jax.model.transformer import Policy
from brorl_jax.rollout import Sampler, SamplerConfig


def load_policy(workdir: str | None, hf_dir: str | None,
                step: int | None, mesh_rules: MeshRules,
                attention_backend: str = "auto"):
  """(Policy, params in the sampling layout, tokenizer) from either source
  (`build.PolicySource`: a workdir, an `hf import` output or an HF
  directory)."""
  path = pathlib.Path(hf_dir if hf_dir is not None else workdir)
  source = PolicySource.find(path)
  if source is None:
    raise FileNotFoundError(
        f"{path} holds no model: neither {checkpointing.MODEL_CONFIG_FILE} "
        "(a training workdir or `hf import` output) nor config.json (a "
        "Hugging Face directory)")
  cfg = source.model_config(attention_backend=attention_backend)
  policy = Policy.create(cfg)
  params, _ = source.load_params(cfg, policy.shardings(mesh_rules),
                                 step=step)
  if source.kind == "brorl_jax" and source.tokenizer_dir == path:
    raise FileNotFoundError(f"{path}/tokenizer is missing: the workdir has "
                            "no tokenizer to decode with")
  return policy, params, tokenizer_loader.load_tokenizer(source.tokenizer_dir)


def sample(policy, params, tokenizer, prompts: list[str], *, chat: bool,
           n: int, greedy: bool, max_new_tokens: int, temperature: float,
           top_p: float, top_k: int, seed: int = 0,
           mesh_rules: MeshRules | None = None) -> dict:
  """Samples n completions per prompt; returns the JSON-ready result."""
  texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}])
           if chat else p for p in prompts]
  ids = [tokenizer.encode(t) for t in texts]
  if any(len(x) == 0 for x in ids):
    raise ValueError("an empty prompt has no next-token distribution")
  lp = max(len(x) for x in ids)
  tokens = np.full((len(ids), lp), tokenizer.pad_id, np.int32)
  for i, x in enumerate(ids):
    tokens[i, lp - len(x):] = x
  lengths = np.array([len(x) for x in ids], np.int32)
  cfg = SamplerConfig(n=n, max_prompt_len=lp, max_new_tokens=max_new_tokens,
                      max_decode_rows=max(n * len(ids), 1),
                      temperature=temperature, top_p=top_p, top_k=top_k,
                      greedy=greedy)
  sampler = Sampler(policy, cfg, stop_ids=tokenizer.stop_ids,
                    pad_id=tokenizer.pad_id, mesh_rules=mesh_rules)
  out = sampler.generate(params, tokens, lengths, jax.random.key(seed))
  toks, lens, lps, stopped = jax.device_get(
      (out.tokens, out.lengths, out.logprobs, out.stopped))
  seqs = [[toks[p, g, :lens[p, g]].tolist() for g in range(n)]
          for p in range(len(ids))]
  return {
      "prompts": prompts, "rendered": texts,
      "completions": [tokenizer.decode_batch(s) for s in seqs],
      "tokens": seqs,
      "logprobs": [[lps[p, g, :lens[p, g]].tolist() for g in range(n)]
                   for p in range(len(ids))],
      "lengths": lens.tolist(), "stopped": stopped.tolist(),
      "finished_slot_frac": float(out.finished_slots) /
      max(float(out.total_slots), 1.0),
      "settings": {"n": n, "greedy": greedy, "max_new_tokens":
                   max_new_tokens, "temperature": temperature,
                   "top_p": top_p, "top_k": top_k, "seed": seed},
  }


def run(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m brorl_jax.sample",
                                   description=__doc__.split("\n\n")[0])
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training workdir or model directory")
  src.add_argument("--hf_dir", "--hf-dir",
                   help="Hugging Face model directory")
  parser.add_argument("--prompt", action="append", required=True)
  parser.add_argument("--chat", action="store_true")
  parser.add_argument("--n", type=int, default=8)
  parser.add_argument("--greedy", action="store_true")
  parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int,
                      default=256)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_p", "--top-p", type=float, default=1.0)
  parser.add_argument("--top_k", "--top-k", type=int, default=0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int, help="checkpoint step (workdir)")
  parser.add_argument("--json", help="write the result as JSON here")
  parser.add_argument("--attention_backend", "--attention-backend",
                      default="auto",
                      choices=ATTENTION_BACKENDS,
                      help="prefill attention (model.attention_backend)")
  args = parser.parse_args(argv)
  jax.config.update("jax_threefry_partitionable", True)
  _, mesh_rules = make_rules(make_mesh((-1, 1, 1)))  # the sampling rules
  try:
    policy, params, tokenizer = load_policy(args.workdir, args.hf_dir,
                                            args.step, mesh_rules,
                                            args.attention_backend)
    result = sample(policy, params, tokenizer, args.prompt, chat=args.chat,
                    n=args.n, greedy=args.greedy,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.seed, mesh_rules=mesh_rules)
  except (FileNotFoundError, ValueError, hf.CheckpointFormatError) as e:
    cli.fail(e)  # ConfigError and DataError are ValueErrors
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return
  for p, completions in zip(args.prompt, result["completions"]):
    print(f"=== {p!r}")
    for g, text in enumerate(completions):
      print(f"--- [{g}] {text}")


if __name__ == "__main__":
  run()
