"""The compiled-HLO cost model against XLA's own cost analysis (CPU
compiles: loop-free programs agree; loops count by their trip count)."""

import jax
import jax.numpy as jnp
import pytest

from brorl_jax.aot import hlo_cost


def _compiled(fn, *shapes):
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  return jax.jit(fn).lower(*args).compile()


def test_loop_free_program_matches_xla():
  def f(w, x):
    y = jnp.tanh(x @ w)
    return (y @ w).sum(0), y[::2]
  compiled = _compiled(f, (256, 256), (128, 256))
  cost = hlo_cost.program_cost(compiled.as_text())
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, list) else xla
  # Two [128,256]x[256,256] products: 2 * 2 * 128 * 256 * 256 FLOPs;
  # XLA also counts the elementwise ops (a few per element).
  assert cost.flops == 4 * 128 * 256 * 256
  assert cost.flops == pytest.approx(xla["flops"], rel=0.01)
  assert cost.bytes == pytest.approx(xla["bytes accessed"], rel=0.05)


@pytest.mark.parametrize("n", [1, 7])
def test_scan_counts_its_trip_count(n):
  def f(w, x):
    return jax.lax.scan(lambda x, _: (jnp.tanh(x @ w), None), x, None,
                        length=n)[0]
  cost = hlo_cost.program_cost(_compiled(f, (64, 64), (32, 64)).as_text())
  assert cost.flops == n * 2 * 32 * 64 * 64


def test_dynamic_loop_is_one_iteration_and_in_place_writes_count_the_update():
  # A decode-like loop: a big buffer written one column a step.
  def f(w, buf, n):
    def body(c):
      i, x, buf = c
      x = jnp.tanh(x @ w)
      return i + 1, x, jax.lax.dynamic_update_slice_in_dim(
          buf, x[:, :1], i, axis=1)
    return jax.lax.while_loop(lambda c: c[0] < n, body,
                              (0, buf[:, :64], buf))[2]
  args = (jax.ShapeDtypeStruct((64, 64), jnp.float32),
          jax.ShapeDtypeStruct((32, 4096), jnp.float32),
          jax.ShapeDtypeStruct((), jnp.int32))
  text = jax.jit(f, donate_argnums=1).lower(*args).compile().as_text()
  once, step = hlo_cost.loop_costs(text)
  assert step.flops == 2 * 32 * 64 * 64
  # The step touches the weights, its activations and one column, never
  # the whole 512 KiB buffer.
  assert step.bytes < 32 * 4096 * 4 / 4, step.bytes
  with pytest.raises(ValueError, match="dynamic trip count"):
    hlo_cost.loop_costs(_compiled(lambda x: x * 2, (4,)).as_text())


def test_scatter_into_a_buffer_counts_the_rows_written():
  # The refill's per-slot writes: one row per slot into a [rows, 4096]
  # buffer, each at its own position.
  def f(buf, pos, x):
    return buf.at[jnp.arange(buf.shape[0]), pos].set(x)
  args = (jax.ShapeDtypeStruct((64, 4096), jnp.float32),
          jax.ShapeDtypeStruct((64,), jnp.int32),
          jax.ShapeDtypeStruct((64,), jnp.float32))
  text = jax.jit(f, donate_argnums=0).lower(*args).compile().as_text()
  assert hlo_cost.program_cost(text).bytes < 64 * 4096 * 4 / 8
