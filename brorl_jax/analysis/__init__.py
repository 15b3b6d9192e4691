"""A comparison's statistics: pure functions over numbers and metrics rows.

  intervals.py  Student-t intervals over seeds, paired differences, a
                curve's value at a budget, the slope test for a plateau
  report.py     `compare.json`'s figures with their uncertainty (per arm
                and paired to the first arm; at the end, at equal tokens,
                at equal wall-clock) and compare's table

No JAX and no I/O. Like the stage folders it never imports `loop/`
(tests/test_import_graph.py): the loop (the plateau stop), `compare` and
`plot` call into it.
"""
