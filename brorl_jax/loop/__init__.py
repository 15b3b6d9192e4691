"""The run: the host side of one RL step and the run's life.

  build.py               one builder of the run (`RunBuild`: mesh rules,
                         policy, optimizer, state layout, sampler) and where
                         a policy comes from (`PolicySource`), shared by the
                         loop, the dry run, evaluate and sample
  experiment.py          the builder's parts + the workdir's: tokenizer,
                         initial parameters, prompt pipeline, reward pool
  trainer.py             `Trainer`: the loop (state, one iteration, resume,
                         preemption, evaluation, checkpoints)
  scoring.py             rollouts scored on host as decode chunks finish
  allocated_sampling.py  unequal rollout counts per prompt (allocation)
  step_log.py            the step's metric rows and rollout archive entries
  evaluator.py           held-out pass@k with the training stack
  metrics.py, rollout_archive.py, workdir.py
                         what a run writes, and the workdir's life cycle
  programs.py            the dry run's compile side (`sizing.py` reports)

Stage folders (data/, model/, rollout/, rewards/, rl/) never import this
package (tests/test_import_graph.py); entry points call into it.
"""
