"""Sensitivity estimators: how much the task loss grows when one layer takes one option.

One registry, one result shape (:class:`SensitivityResult`): a table with a row per (layer, option) whose ``score``
is an estimate of the loss increase (so scores of different layers add up, and solvers can sum them), plus what the
estimate cost (forward/backward passes, seconds).
"""

from mpq.sensitivity.base import (SensitivityEstimator, SensitivityResult, available_estimators, get_estimator,
                                  register_estimator)
from mpq.sensitivity.hessian import HessianTraceEstimator, hutchinson_traces

__all__ = ["SensitivityEstimator", "SensitivityResult", "register_estimator", "get_estimator",
           "available_estimators", "HessianTraceEstimator", "hutchinson_traces"]
