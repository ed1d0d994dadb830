"""What a run reports, in one package: its metrics, its tables, its figures, W&B.

- :mod:`~fedmoe.reporting.metrics`: the numbers a run is judged by, each defined once.
- :mod:`~fedmoe.reporting.summary`: the tables and headline printed at the end of a run.
- :mod:`~fedmoe.reporting.sweep`: ``fedmoe report``, a sweep's runs in one table, paired
  comparisons with bootstrap intervals (:mod:`~fedmoe.reporting.stats`).
- :mod:`~fedmoe.reporting.figures`: every PNG figure (runs, sweeps, analyses).
- :mod:`~fedmoe.reporting.tracking`: Weights & Biases.

Nothing here is imported on import of the package: ``fedmoe report`` must not pay for
matplotlib or wandb it does not use.
"""
