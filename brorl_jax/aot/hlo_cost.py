"""FLOPs and bytes of a compiled program, loops counted by their trip count.

Read from the compiled HLO text (`compiled.as_text()`), for compilers that
give no `cost_analysis()` ahead of time (XLA:GPU's deviceless executables
answer "GetCostAnalysis is not supported") and because XLA's cost analysis
counts a while loop's body once whatever its trip count (the update's
micro-batch scan, the vocabulary-chunk loop of its log-probs). The model is
XLA's `HloCostAnalysis` in small:

  * FLOPs: 2 per multiply-add of every `dot` (and cuDNN attention custom
    calls from their shapes: 4 B N T S H forward, 2.5x that backward, half
    under a causal mask); elementwise work is not counted (it is memory
    bound: its bytes are).
  * bytes: what each top-level op (a fusion, a custom call, a copy, a
    collective) reads and writes at its boundary, as HBM traffic: operands
    + results, except that a slice read counts the slice and an in-place
    `dynamic-update-slice` or `scatter` counts the update, not its buffer
    (XLA's rules for fusion parameters).
  * a while loop counts its body `known_trip_count` times (1 where the trip
    count is dynamic, e.g. the decode loop: its figure is one iteration);
    a conditional counts its largest branch.

Custom calls' bytes are also kept apart by target (`Cost.custom_bytes`),
for callers that know better what a kernel reads (the decode's suffix
kernel reads each row to its own length, not the whole operand).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_ITEM = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1,
         "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
         "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
         "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEM) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
# Ops that move no data of their own (views, tuples, control).
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast",
         "after-all", "partition-id", "replica-id", "iota", "opt-barrier",
         "add-dependency", "while", "conditional", "call", "async-done",
         "all-gather-done", "all-reduce-done", "collective-permute-done",
         "copy-done", "send-done", "recv-done"}
_SLICES = {"dynamic-slice", "slice", "gather"}
# Ops XLA runs in place on their first operand: they touch their update,
# not the buffer.
_IN_PLACE = {"dynamic-update-slice", "scatter"}


def _update(i) -> str:
  """The update operand of an in-place op (DUS: 1; scatter: the last)."""
  return i.operands[1] if i.opcode == "dynamic-update-slice" else \
      i.operands[-1]
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")


@dataclasses.dataclass
class Cost:
  """A program's (or one computation's) cost per execution.

  Attributes:
    flops: floating-point operations (see module doc).
    bytes: HBM bytes read + written by top-level ops.
    launches: top-level ops that run as kernels (fusions, custom calls,
      copies, collectives), loops unrolled by their trip counts.
    collective_bytes: the part of `bytes` moved by collectives.
    custom_bytes: {custom-call target: bytes} (included in `bytes`).
    dynamic_loops: while loops with no known trip count (counted once).
  """

  flops: float = 0.0
  bytes: float = 0.0
  launches: float = 0.0
  collective_bytes: float = 0.0
  custom_bytes: dict = dataclasses.field(
      default_factory=lambda: collections.defaultdict(float))
  dynamic_loops: int = 0

  def add(self, other: "Cost", times: float = 1.0) -> None:
    self.flops += times * other.flops
    self.bytes += times * other.bytes
    self.launches += times * other.launches
    self.collective_bytes += times * other.collective_bytes
    for k, v in other.custom_bytes.items():
      self.custom_bytes[k] += times * v
    self.dynamic_loops += other.dynamic_loops


@dataclasses.dataclass
class _Instr:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str


def _shape_bytes(shape: str) -> float:
  return sum(_ITEM[t] * math.prod(int(d) for d in dims.split(",") if d)
             for t, dims in _ARRAY.findall(shape))


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _closing(s: str, i: int) -> int:
  """Index of the bracket closing the one opened at s[i]."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  depth, want = 0, pairs[s[i]]
  for j in range(i, len(s)):
    if s[j] == s[i]:
      depth += 1
    elif s[j] == want:
      depth -= 1
      if depth == 0:
        return j
  return len(s) - 1


def _parse_instr(name: str, rest: str) -> _Instr:
  if rest.startswith("("):
    end = _closing(rest, 0) + 1
  else:
    end = rest.index(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  m = re.match(r"([\w\-$]+)\(", rest)
  opcode = m.group(1)
  close = _closing(rest, m.end() - 1)
  operands = re.findall(r"%([\w.\-]+)", rest[m.end():close])
  return _Instr(name, shape, opcode, operands, rest[close + 1:])


def parse_computations(text: str) -> tuple[dict[str, list[_Instr]], str]:
  """HLO module text -> ({computation: instructions}, entry name)."""
  comps: dict[str, list[_Instr]] = {}
  entry, current = None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      comps[current].append(_parse_instr(m.group(1), m.group(2)))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _attr(attrs: str, key: str) -> str | None:
  m = re.search(rf"\b{key}=%([\w.\-]+)", attrs)
  return m.group(1) if m else None


def _branches(attrs: str) -> list[str]:
  m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
  if m:
    return re.findall(r"%([\w.\-]+)", m.group(1))
  return [c for c in (_attr(attrs, "true_computation"),
                      _attr(attrs, "false_computation")) if c]


def _trip_count(attrs: str) -> int | None:
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
  return int(m.group(1)) if m else None


class _Model:

  def __init__(self, text: str):
    self.comps, self.entry = parse_computations(text)
    self.shapes = {c: {i.name: i.shape for i in instrs}
                   for c, instrs in self.comps.items()}
    self._flops: dict[str, float] = {}

  # ---- FLOPs -----------------------------------------------------------------

  def flops(self, comp: str) -> float:
    """FLOPs of one execution of `comp`, nested calls included."""
    if comp not in self._flops:
      self._flops[comp] = sum(self._instr_flops(comp, i)
                              for i in self.comps[comp])
    return self._flops[comp]

  def _instr_flops(self, comp: str, i: _Instr) -> float:
    if i.opcode == "dot":
      lhs = _dims(self.shapes[comp][i.operands[0]])
      m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs)
      k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m \
          else 1
      return 2.0 * math.prod(_dims(i.shape)) * k
    if i.opcode == "custom-call":
      return self._custom_flops(comp, i)
    if i.opcode == "while":
      return (_trip_count(i.attrs) or 1) * self.flops(_attr(i.attrs, "body"))
    if i.opcode == "conditional":
      return max((self.flops(b) for b in _branches(i.attrs)), default=0.0)
    called = _attr(i.attrs, "calls") or _attr(i.attrs, "to_apply")
    if called and i.opcode in ("fusion", "call", "async-start"):
      return self.flops(called)
    return 0.0

  def _custom_flops(self, comp: str, i: _Instr) -> float:
    target = re.search(r'custom_call_target="([^"]*)"', i.attrs)
    target = target.group(1) if target else ""
    if not target.startswith("__cudnn$fmha"):
      return 0.0
    q, k = (_dims(self.shapes[comp][o]) for o in i.operands[:2])
    if len(q) != 4 or len(k) != 4:
      return 0.0
    # BTNH (or BNTH) layouts: B and H at the ends, N x T the middle.
    b, h = q[0], q[3]
    nt, s = q[1] * q[2], k[1] if k[2] == q[2] or k[2] < k[1] else k[2]
    fwd = 4.0 * b * nt * s * h
    if "CAUSAL" in i.attrs:
      fwd *= 0.5
    return 2.5 * fwd if "Backward" in target else fwd

  # ---- bytes -----------------------------------------------------------------

  def cost(self, comp: str) -> Cost:
    """Bytes and launches of one execution of non-fused `comp`."""
    out = Cost()
    for i in self.comps[comp]:
      if i.opcode == "while":
        trip = _trip_count(i.attrs)
        body = self.cost(_attr(i.attrs, "body"))
        out.add(body, trip or 1)
        out.dynamic_loops += trip is None
      elif i.opcode == "conditional":
        costs = [self.cost(b) for b in _branches(i.attrs)]
        if costs:
          out.add(max(costs, key=lambda c: c.bytes))
      elif i.opcode == "call":
        out.add(self.cost(_attr(i.attrs, "to_apply")))
      elif i.opcode not in _FREE:
        moved = self._boundary_bytes(comp, i)
        out.bytes += moved
        out.launches += 1
        if i.opcode.startswith(COLLECTIVES):
          out.collective_bytes += moved
        if i.opcode == "custom-call":
          target = re.search(r'custom_call_target="([^"]*)"', i.attrs)
          out.custom_bytes[target.group(1) if target else "?"] += moved
    out.flops = self.flops(comp)
    return out

  def _boundary_bytes(self, comp: str, i: _Instr) -> float:
    shapes = self.shapes[comp]
    operand = [_shape_bytes(shapes.get(o, "")) for o in i.operands]
    if i.opcode in _SLICES:
      return 2.0 * _shape_bytes(i.shape)
    if i.opcode == "dynamic-update-slice":
      return 2.0 * operand[1]
    if i.opcode == "scatter":                 # in place: indices + updates
      return sum(operand[1:]) + operand[-1]
    if i.opcode != "fusion":
      return sum(operand) + _shape_bytes(i.shape)
    fused = self.comps[_attr(i.attrs, "calls")]
    users = collections.defaultdict(list)
    for f in fused:
      for pos, o in enumerate(f.operands):
        users[o].append((f, pos))
    read = 0.0
    for f in fused:
      if f.opcode != "parameter":
        continue
      use = users[f.name]
      if use and all(u.opcode in _SLICES and pos == 0 for u, pos in use):
        read += sum(_shape_bytes(u.shape) for u, _ in use)
      elif not (use and all(u.opcode in _IN_PLACE and pos == 0
                            for u, pos in use)):
        read += _shape_bytes(f.shape)      # (an in-place buffer: not read)
    root = fused[-1]
    written = _shape_bytes(i.shape)
    roots = ([self._by_name(fused, o) for o in root.operands]
             if root.opcode == "tuple" else [root])
    if any(r is not None and r.opcode in _IN_PLACE for r in roots):
      written = sum(
          _shape_bytes(self._by_name(fused, _update(r)).shape
                       if r.opcode in _IN_PLACE else r.shape)
          for r in roots if r is not None)
    return read + written

  @staticmethod
  def _by_name(instrs: list[_Instr], name: str) -> _Instr | None:
    return next((x for x in instrs if x.name == name), None)


def program_cost(hlo_text: str) -> Cost:
  """The cost of one execution of a compiled program (its HLO text)."""
  model = _Model(hlo_text)
  return model.cost(model.entry)


def loop_costs(hlo_text: str) -> tuple[Cost, Cost]:
  """(the program outside its dynamic loops, one iteration of them).

  A while loop of the entry computation with no known trip count (the
  decode loop, a refill segment) runs as many times as the data says; its
  body is one iteration (a decode step), the rest runs once per call.

  Raises:
    ValueError: the program has no such loop.
  """
  model = _Model(hlo_text)
  once, iteration, found = Cost(), Cost(), False
  for i in model.comps[model.entry]:
    if i.opcode == "while" and _trip_count(i.attrs) is None:
      iteration.add(model.cost(_attr(i.attrs, "body")))
      found = True
  if not found:
    raise ValueError("the program has no while loop of dynamic trip count")
  total = model.cost(model.entry)
  once.add(total)
  once.add(iteration, -1.0)
  once.dynamic_loops = 0
  return once, iteration
