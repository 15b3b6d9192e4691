"""The run: the host side of one RL step and the run's life.

  experiment.py          builds the run's parts from a `RunConfig`
  trainer.py             `Trainer`: the loop (state, one iteration, resume,
                         preemption, evaluation, checkpoints)
  scoring.py             rollouts scored on host as decode chunks finish
  allocated_sampling.py  unequal rollout counts per prompt (allocation)
  step_log.py            the step's metric rows and rollout archive entries
  evaluator.py           held-out pass@k with the training stack
  metrics.py, rollout_archive.py, workdir.py
                         what a run writes, and the workdir's life cycle

Stage folders (data/, model/, rollout/, rewards/, rl/) never import this
package (tests/test_import_graph.py); entry points call into it.
"""
