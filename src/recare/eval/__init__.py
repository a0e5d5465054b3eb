"""Evaluation runs (method §5): several models on robustness, utility and CARE score in one command.

`config` (EvalConfig, methods, input validation), `runner` (`evaluate_all`, `evaluate_robustness_of`).
May import: recare.attacks, recare.metrics, recare.report, recare.generate, recare.models,
recare.io, recare.errors, recare.config.
"""

from recare.eval.config import EvalConfig, MethodSpec, eval_config_from, read_eval_spec
from recare.eval.runner import evaluate_all, evaluate_robustness_of

__all__ = ["EvalConfig", "MethodSpec", "eval_config_from", "evaluate_all", "evaluate_robustness_of", "read_eval_spec"]
