"""What ``fedmoe simulate`` returns: one number of the finished run, for a Hydra sweeper.

``objective`` (``conf/simulate.yaml``) names a key of the run's summary
(:func:`fedmoe.reporting.tracking.summary_metrics`, the numbers W&B shows as the run's
summary), so the Optuna sweeper (``hparams_search=optuna``) minimizes exactly what the tables
report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedmoe.config import OBJECTIVES
from fedmoe.reporting.tracking import summary_metrics

# Keys of summary_metrics that make sense to minimize or maximize.


def check_objective(key: str) -> None:
    """Fail before the run, naming the config key, when ``objective`` is not a summary key."""
    if key not in OBJECTIVES:
        raise ValueError(f"objective={key!r}: must be one of {list(OBJECTIVES)}")


def objective_value(results: Mapping[str, Any], key: str) -> float:
    """The run's ``key`` summary value (``nan`` when the run has none, e.g. no evaluation:
    Optuna records such a trial as failed instead of ranking it)."""
    check_objective(key)
    value = summary_metrics(results).get(key)
    return float(value) if value is not None else math.nan
