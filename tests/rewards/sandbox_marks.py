"""Which sandbox backends work here, and the mark for tests that need one.

CI sets BRORL_REQUIRE_SANDBOX=1: there a missing sandbox fails the tests
instead of skipping them.
"""

import contextlib
import os

import pytest

from brorl_jax.rewards import sandbox
from brorl_jax.rewards.config import CodeConfig

# pylint: disable-next=protected-access
FAILURES = {b: sandbox._probe(b, CodeConfig(sandbox=b))
            for b in ("bwrap", "unshare")}
BACKENDS = [b for b, failure in FAILURES.items() if failure is None]
for _backend in BACKENDS:  # decided now, so that `fresh_choices` restores it
  sandbox.backend_for(CodeConfig(sandbox=_backend))
REQUIRED = os.environ.get("BRORL_REQUIRE_SANDBOX") == "1"

needs_sandbox = pytest.mark.skipif(
    not BACKENDS and not REQUIRED,
    reason=f"no sandbox works here ({FAILURES}); install bubblewrap")


@contextlib.contextmanager
def fresh_choices():
  """Runs a block with no sandbox decision made yet; the decisions made
  before it are back afterwards (so later tests pay no second self-test)."""
  # pylint: disable=protected-access
  saved = dict(sandbox._CHOSEN)
  sandbox.forget_choices()
  try:
    yield
  finally:
    sandbox.forget_choices()
    sandbox._CHOSEN.update(saved)
