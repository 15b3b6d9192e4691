"""Progress reporting: bar, plain lines or nothing, and the auto choice."""

import io

import pytest

from brorl_jax import progress
from brorl_jax.progress import Progress


class _Stream(io.StringIO):
  def __init__(self, tty: bool):
    super().__init__()
    self._tty = tty

  def isatty(self) -> bool:
    return self._tty


def test_auto_is_a_bar_on_a_terminal_and_lines_elsewhere():
  assert progress.resolve(None, _Stream(tty=True)) == "bar"
  assert progress.resolve("auto", _Stream(tty=False)) == "lines"
  assert progress.resolve("off", _Stream(tty=True)) == "off"
  with pytest.raises(ValueError, match="bars"):
    progress.resolve("bars")


def test_lines_mode_prints_one_line_per_update_with_its_fields():
  out = _Stream(tty=False)
  with Progress("lines", "RL step", 3, stream=out) as p:
    p.update(1, {"reward": 0.125, "tokens/s": 2114.31, "eval": None})
    p.update(2, {"reward": 0.25})
  assert out.getvalue().splitlines() == [
      "RL step 1/3  reward 0.125  tokens/s 2114", "RL step 2/3  reward 0.25"]


def test_lines_mode_caps_the_number_of_lines_and_prints_the_last():
  out = _Stream(tty=False)
  p = Progress("lines", "hf export", 95, unit="tensors", max_lines=10,
               stream=out)
  for done in range(1, 96):
    p.update(done)
  lines = out.getvalue().splitlines()
  assert len(lines) == 10
  assert lines[0] == "hf export 10/95 tensors"
  assert lines[-1] == "hf export 95/95 tensors"


def test_a_resumed_phase_counts_from_its_start():
  out = _Stream(tty=False)
  p = Progress("lines", "RL step", 10, initial=4, stream=out)
  p.update(5)
  assert out.getvalue() == "RL step 5/10\n"


@pytest.mark.parametrize("mode,enabled", [("off", True), ("lines", False),
                                          ("bar", True)])
def test_off_disabled_and_bar_print_no_lines(mode, enabled, capsys):
  out = _Stream(tty=False)
  with Progress(mode, "eval", 4, enabled=enabled, stream=out) as p:
    for i in range(1, 5):
      p.update(i, {"pass@1": 0.5})
  assert out.getvalue() == ""
  # The bar draws on stderr (tqdm), never on stdout.
  assert capsys.readouterr().out == ""
