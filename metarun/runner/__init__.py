"""The runner: everything between the command line and the algorithm.

- :mod:`~metarun.runner.build`: the one place a config becomes objects;
- :mod:`~metarun.runner.trainer`: the outer loop (signals, validation, checkpoints);
- :mod:`~metarun.runner.evaluate`: fixed-task evaluation, mean and 95% CI;
- :mod:`~metarun.runner.checkpoint`: atomic checkpoints and random states;
- :mod:`~metarun.runner.logging`: TensorBoard and ``metrics.jsonl``;
- :mod:`~metarun.runner.api`: ``run`` (what the CLI calls: train, or evaluate a checkpoint);
- :mod:`~metarun.runner.resume`: when and from which checkpoint a run continues;
- :mod:`~metarun.runner.results`: the test split, ``results.json``, the printed summary;
- :mod:`~metarun.runner.learner`: ``load`` and ``Learner`` (the Python API).
"""
