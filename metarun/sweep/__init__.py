"""Sweeps and clusters on top of Hydra's multirun (``metarun -m ...``).

* :mod:`metarun.sweep.summary`: the sweep's table (``summary.csv`` / ``summary.md``), the
  ``metarun-summary DIR`` command and the objective that sweepers such as Optuna minimise.
* :mod:`metarun.sweep.callback`: the Hydra callback that records each job's status and keeps the
  table current (``conf/config.yaml``: ``hydra.callbacks``).
* :mod:`metarun.sweep.preemption`: submitit's preemption/time-limit signal saves a checkpoint
  before the job is requeued.

Launching is Hydra's and its plugins': the basic launcher, ``hydra/launcher=joblib``
(hydra-joblib-launcher), ``hydra/launcher=local`` / ``slurm`` (hydra-submitit-launcher,
``conf/hydra/launcher/``) and ``+search=optuna`` (hydra-optuna-sweeper, ``conf/search/``).
Only :mod:`~metarun.sweep.preemption` imports torch (through the trainer).
"""
