"""Hugging Face interchange: safetensors + config.json import and export.

  python -m brorl_jax.hf import --hf_dir HF_DIR --out runs/x/init
  python -m brorl_jax.hf export --workdir runs/demo [--step S] --out HF_DIR

One table (`_MAPPING`) maps every Hugging Face tensor name to our parameter
path and gives the layout transform both ways, for Qwen2, Qwen3 and Llama
alike (they differ in which tensors exist: biases, q/k norms, lm_head);
config.json is converted in `model/hf_config.py`. Import reads one tensor at a
time (safetensors memory-maps the file) and writes it straight into its
target sharding, so a checkpoint never needs twice its size in host RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from brorl_jax import checkpointing, cli
from brorl_jax.integrity import atomic
# config.json <-> ModelConfig lives in model/hf_config; re-exported here.
from brorl_jax.model.hf_config import (  # noqa: F401
    SUPPORTED_ARCHITECTURES, CheckpointFormatError, architecture_of,
    config_from_hf, config_to_hf, generation_config)
from brorl_jax.model.config import ModelConfig
from brorl_jax.model.transformer import Policy
from brorl_jax.progress import Progress

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                   "merges.txt", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model",
                   "added_tokens.json")
MAX_SHARD_BYTES = 5 * 1024**3


# ---- the name-mapping table ------------------------------------------------
# (HF regex, our path template, HF -> ours, ours -> HF). `c` is the
# ModelConfig; transforms take and return numpy arrays.

def _t(x, c):  # [out, in] <-> [in, out]
  return x.T


def _q_in(x, c):  # [N*H, D] -> [D, N, H]
  return x.T.reshape(c.embed_dim, -1, c.head_dim)


def _kv_in(x, c):
  return x.T.reshape(c.embed_dim, -1, c.head_dim)


def _proj_out(x, c):  # [D, N, H] -> [N*H, D]
  return x.reshape(c.embed_dim, -1).T


def _bias_in(x, c):  # [N*H] -> [N, H]
  return x.reshape(-1, c.head_dim)


def _bias_out(x, c):
  return x.reshape(-1)


def _o_in(x, c):  # [D, N*H] -> [N, H, D]
  return x.T.reshape(-1, c.head_dim, c.embed_dim)


def _o_out(x, c):
  return x.reshape(-1, c.embed_dim).T


def _id(x, c):
  return x


_L = r"model\.layers\.(\d+)\."
_MAPPING: tuple[tuple[str, str, Callable, Callable], ...] = (
    (r"model\.embed_tokens\.weight", "embedder/embedding", _id, _id),
    (_L + r"input_layernorm\.weight", "layer_{0}/attn_norm/scale", _id, _id),
    (_L + r"self_attn\.q_proj\.weight", "layer_{0}/attn/q_proj", _q_in,
     _proj_out),
    (_L + r"self_attn\.k_proj\.weight", "layer_{0}/attn/k_proj", _kv_in,
     _proj_out),
    (_L + r"self_attn\.v_proj\.weight", "layer_{0}/attn/v_proj", _kv_in,
     _proj_out),
    (_L + r"self_attn\.q_proj\.bias", "layer_{0}/attn/q_bias", _bias_in,
     _bias_out),
    (_L + r"self_attn\.k_proj\.bias", "layer_{0}/attn/k_bias", _bias_in,
     _bias_out),
    (_L + r"self_attn\.v_proj\.bias", "layer_{0}/attn/v_bias", _bias_in,
     _bias_out),
    (_L + r"self_attn\.q_norm\.weight", "layer_{0}/attn/q_norm/scale", _id,
     _id),
    (_L + r"self_attn\.k_norm\.weight", "layer_{0}/attn/k_norm/scale", _id,
     _id),
    (_L + r"self_attn\.o_proj\.weight", "layer_{0}/attn/o_proj", _o_in,
     _o_out),
    (_L + r"post_attention_layernorm\.weight", "layer_{0}/mlp_norm/scale",
     _id, _id),
    (_L + r"mlp\.gate_proj\.weight", "layer_{0}/mlp/gate_proj", _t, _t),
    (_L + r"mlp\.up_proj\.weight", "layer_{0}/mlp/up_proj", _t, _t),
    (_L + r"mlp\.down_proj\.weight", "layer_{0}/mlp/down_proj", _t, _t),
    (r"model\.norm\.weight", "final_norm/scale", _id, _id),
    (r"lm_head\.weight", "lm_head/kernel", _t, _t),
)


def hf_to_ours(name: str) -> tuple[str, Callable, Callable] | None:
  """Our path and the two transforms for an HF tensor name (None: unknown)."""
  for pattern, template, to_ours, to_hf in _MAPPING:
    m = re.fullmatch(pattern, name)
    if m:
      return template.format(*m.groups()), to_ours, to_hf
  return None


def ours_to_hf(path: str) -> tuple[str, Callable]:
  """The HF tensor name and the ours -> HF transform for one of our paths."""
  for pattern, template, _, to_hf in _MAPPING:
    tmpl = re.escape(template).replace(r"\{0\}", r"(\d+)")
    m = re.fullmatch(tmpl, path)
    if m:
      name = pattern.replace(r"(\d+)", "{0}").replace("\\.", ".")
      return name.format(*m.groups()), to_hf
  raise KeyError(f"parameter {path!r} has no Hugging Face name")


# ---- reading safetensors ---------------------------------------------------

def _safetensor_files(hf_dir: pathlib.Path) -> list[pathlib.Path]:
  check_complete(hf_dir)
  index = hf_dir / "model.safetensors.index.json"
  if index.exists():
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [hf_dir / n for n in names]
  single = hf_dir / "model.safetensors"
  if single.exists():
    return [single]
  raise CheckpointFormatError(
      f"{hf_dir} has neither model.safetensors nor "
      "model.safetensors.index.json (convert .bin checkpoints with "
      "transformers' save_pretrained(safe_serialization=True))")


def check_complete(hf_dir: pathlib.Path) -> None:
  """Refuses an export of ours that did not finish (`atomic.MARKER`)."""
  problem = atomic.incomplete(hf_dir)
  if problem is not None:
    raise CheckpointFormatError(
        f"{hf_dir} is an incomplete export: {problem}; export it again "
        "(python -m brorl_jax.hf export)")


def iter_hf_tensors(hf_dir: pathlib.Path) -> Iterator[tuple[str, Any]]:
  """Yields (name, lazy slice) for every tensor, without loading any."""
  for path in _safetensor_files(hf_dir):
    with safe_open(str(path), framework="numpy") as f:
      for name in f.keys():
        yield name, f.get_slice(name)


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(_leaves(v, path))
    else:
      out[path] = v
  return out


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
  *parents, last = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[last] = value


def load_hf_params(hf_dir: str | os.PathLike, cfg: ModelConfig,
                   shardings: dict[str, Any] | None = None, *,
                   progress: str | None = None) -> dict[str, Any]:
  """Loads HF safetensors into our parameter tree, tensor by tensor.

  Args:
    hf_dir: a directory with model.safetensors (or a sharded index).
    cfg: the model config (from `config_from_hf`).
    shardings: our NamedShardings tree; None puts arrays on the default
      device.
    progress: "bar", "lines", "off" or None (bar on a terminal, else
      lines): tensors loaded (process 0 reports).

  Returns:
    The parameter tree, in `cfg.param_dtype`.

  Raises:
    CheckpointFormatError: naming the tensor, on a missing, unexpected or
      wrongly shaped tensor.
  """
  expected = {p: a for p, a in _leaves(Policy.create(cfg).abstract_params()
                                       ).items()}
  flat_shardings = _leaves(shardings) if shardings is not None else {}
  dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  params: dict[str, Any] = {}
  seen = set()
  report = Progress(progress, "hf import", len(expected), unit="tensors",
                    max_lines=10, enabled=jax.process_index() == 0)
  for name, tensor in iter_hf_tensors(pathlib.Path(hf_dir)):
    if cfg.tie_embeddings and name == "lm_head.weight":
      continue  # some tied checkpoints still store the (identical) head
    mapped = hf_to_ours(name)
    if mapped is None or mapped[0] not in expected:
      raise CheckpointFormatError(
          f"unexpected tensor {name!r} with shape {tensor.get_shape()} in "
          f"{hf_dir}: it has no place in a {cfg.num_layers}-layer "
          f"{architecture_of(cfg)} (wrong architecture or config.json?)")
    path, to_ours, _ = mapped
    value = to_ours(tensor[:], cfg)
    want = expected[path].shape
    if tuple(value.shape) != tuple(want):
      raise CheckpointFormatError(
          f"tensor {name!r} has shape {tuple(tensor.get_shape())}, which maps "
          f"to {tuple(value.shape)}; expected {tuple(want)} for {path} under "
          "config.json")
    value = np.ascontiguousarray(value.astype(dtype))
    sharding = flat_shardings.get(path)
    if sharding is None:
      array = jax.device_put(value)
    else:
      array = jax.make_array_from_callback(value.shape, sharding,
                                           lambda idx, v=value: v[idx])
    _set(params, path, array)
    seen.add(path)
    report.update(len(seen))
    del value
  report.close()
  missing = sorted(set(expected) - seen)
  if missing:
    name, _ = ours_to_hf(missing[0])
    raise CheckpointFormatError(
        f"tensor {name!r} (shape {tuple(expected[missing[0]].shape)} as "
        f"{missing[0]}) is missing from {hf_dir}; {len(missing)} missing in "
        "all")
  return params


def copy_tokenizer_files(src: pathlib.Path, dst: pathlib.Path) -> list[str]:
  """Copies the tokenizer files found in `src` into `dst`."""
  dst.mkdir(parents=True, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    if (src / name).exists():
      shutil.copy2(src / name, dst / name)
      copied.append(name)
  return copied


# ---- writing safetensors ---------------------------------------------------

def save_hf(params: dict[str, Any], cfg: ModelConfig,
            out_dir: str | os.PathLike, *, dtype: str = "float32",
            tokenizer_dir: pathlib.Path | None = None,
            stop_ids: tuple[int, ...] = (),
            max_shard_bytes: int = MAX_SHARD_BYTES,
            progress: str | None = None) -> None:
  """Writes a transformers-loadable checkpoint (only on process 0).

  Args:
    params: our parameter tree (any sharding; gathered tensor by tensor).
    cfg: its model config.
    out_dir: output directory.
    dtype: "float32" or "bfloat16".
    tokenizer_dir: tokenizer files to copy alongside.
    stop_ids: extra eos ids for generation_config.json.
    max_shard_bytes: shard size limit (5 GB, as transformers).
    progress: "bar", "lines", "off" or None (bar on a terminal, else
      lines): tensors written (process 0 reports).
  """
  writer = jax.process_index() == 0
  # Written beside `out_dir`, marked complete, renamed into place: a kill
  # leaves an earlier export whole and nothing that import accepts.
  with atomic.directory(out_dir, enabled=writer) as tmp:
    _write_hf(params, cfg, tmp, writer, dtype=dtype,
              tokenizer_dir=tokenizer_dir, stop_ids=stop_ids,
              max_shard_bytes=max_shard_bytes, progress=progress)


def _write_hf(params, cfg, out: pathlib.Path, writer: bool, *, dtype: str,
              tokenizer_dir, stop_ids, max_shard_bytes, progress) -> None:
  """`save_hf`'s files, into `out` (the temporary directory)."""
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  weight_map = {}

  def flush():
    nonlocal size
    idx = len(shards)
    name = f"model-{idx:05d}.safetensors"
    if writer:
      save_file(shards[-1], str(out / name), metadata={"format": "pt"})
    for k in shards[-1]:
      weight_map[k] = name
    shards.append({})
    size = 0

  leaves = sorted(_leaves(params).items())
  report = Progress(progress, "hf export", len(leaves), unit="tensors",
                    max_lines=10, enabled=writer)
  for done, (path, array) in enumerate(leaves, 1):
    if jax.process_count() > 1:
      array = multihost_utils.process_allgather(array, tiled=True)
    name, to_hf = ours_to_hf(path)
    value = np.ascontiguousarray(to_hf(np.asarray(array), cfg)
                                 .astype(np_dtype))
    if size and size + value.nbytes > max_shard_bytes:
      flush()
    shards[-1][name] = value
    size += value.nbytes
    report.update(done)
  flush()
  report.close()
  n = len(shards) - 1
  if not writer:
    return
  if n == 1:
    os.replace(out / "model-00001.safetensors", out / "model.safetensors")
  else:
    for i in range(1, n + 1):
      os.replace(out / f"model-{i:05d}.safetensors",
                 out / f"model-{i:05d}-of-{n:05d}.safetensors")
    weight_map = {k: v.replace(".safetensors", f"-of-{n:05d}.safetensors")
                  for k, v in weight_map.items()}
    total = sum(int(np.prod(np.shape(a))) * np.dtype(np_dtype).itemsize
                for a in _leaves(params).values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map},
        indent=2))
  (out / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype),
                                              indent=2))
  (out / "generation_config.json").write_text(json.dumps(
      generation_config(cfg, stop_ids), indent=2))
  if tokenizer_dir is not None:
    copy_tokenizer_files(pathlib.Path(tokenizer_dir), out)


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, *,
              param_dtype: str | None = None,
              progress: str | None = None) -> ModelConfig:
  """`hf import`: HF directory -> model dir (params, model config, tokenizer).

  The output directory holds `params/` (an orbax checkpoint),
  `model_config.json` and `tokenizer/`; the train loop's `init.path` and
  `export` read it.
  """
  hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(out)
  check_complete(hf_dir)
  hf_config = json.loads((hf_dir / "config.json").read_text())
  source = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
  cfg = config_from_hf(hf_config, param_dtype=param_dtype or source,
                       dtype=param_dtype or source)
  params = load_hf_params(hf_dir, cfg, progress=progress)
  checkpointing.save_params(out / "params", params)
  checkpointing.save_model_config(cfg, out)
  copy_tokenizer_files(hf_dir, out / "tokenizer")
  return cfg


def export_hf(workdir: str | os.PathLike, out: str | os.PathLike, *,
              step: int | None = None, dtype: str | None = None,
              progress: str | None = None) -> None:
  """`hf export`: a model dir or training workdir -> HF directory."""
  workdir = pathlib.Path(workdir)
  cfg, params, tokenizer_dir = checkpointing.load_policy_params(workdir, step)
  save_hf(params, cfg, out, dtype=dtype or cfg.param_dtype,
          tokenizer_dir=tokenizer_dir, progress=progress)


def run(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m brorl_jax.hf",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  progress = argparse.ArgumentParser(add_help=False)
  progress.add_argument(
      "--progress", choices=("auto", "bar", "lines", "off"), default="auto",
      help="tensors done: a bar, plain lines, or nothing (auto: a bar on a "
      "terminal, else lines)")
  imp = sub.add_parser("import", help="HF directory -> brorl_jax model dir",
                       parents=[progress])
  imp.add_argument("--hf_dir", "--hf-dir", required=True)
  imp.add_argument("--out", required=True)
  imp.add_argument("--param_dtype", "--param-dtype",
                   choices=("float32", "bfloat16"))
  exp = sub.add_parser("export", help="brorl_jax workdir -> HF directory",
                       parents=[progress])
  exp.add_argument("--workdir", required=True)
  exp.add_argument("--step", type=int)
  exp.add_argument("--out", required=True)
  exp.add_argument("--dtype", choices=("float32", "bfloat16"))
  args = parser.parse_args(argv)
  with cli.input_errors(CheckpointFormatError, FileNotFoundError,
                        FileExistsError,
                        checkpointing.CheckpointError):
    if args.command == "import":
      cfg = import_hf(args.hf_dir, args.out, param_dtype=args.param_dtype,
                      progress=args.progress)
      print(f"imported {cfg.num_params():,} parameters into {args.out}")
    else:
      export_hf(args.workdir, args.out, step=args.step, dtype=args.dtype,
                progress=args.progress)
      print(f"exported to {args.out}")


if __name__ == "__main__":
  run()
