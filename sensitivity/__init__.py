"""Sensitivity estimators: how much the task loss grows when one layer takes one option.

One registry, one result shape (:class:`SensitivityResult`): a table with a row per (layer, option) whose ``score``
is an estimate of the loss increase (so scores of different layers add up, and solvers can sum them), plus what the
estimate cost (forward/backward passes, seconds).
"""

from mpq.sensitivity.base import (CombinedEstimator, ScoreError, SensitivityEstimator, SensitivityResult,
                                  available_estimators, get_estimator, normalize, register_estimator)
from mpq.sensitivity.entropy import EntropyProxyEstimator, entropy_drop, histogram_entropy
from mpq.sensitivity.fisher import FisherEstimator, fisher_diagonals
from mpq.sensitivity.hessian import HessianTraceEstimator, hutchinson_traces
from mpq.sensitivity.lrp import LRPEstimator, layer_relevance, lrp_rules
from mpq.sensitivity.measured import DecoupledEstimator, MeasuredEstimator, single_layer_deltas

__all__ = ["SensitivityEstimator", "SensitivityResult", "ScoreError", "CombinedEstimator", "register_estimator",
           "get_estimator", "available_estimators", "normalize", "HessianTraceEstimator", "hutchinson_traces",
           "MeasuredEstimator", "DecoupledEstimator", "single_layer_deltas", "EntropyProxyEstimator",
           "entropy_drop", "histogram_entropy", "FisherEstimator", "fisher_diagonals", "LRPEstimator",
           "layer_relevance", "lrp_rules"]
