"""Evaluation: quality metrics (ppl, KL, top-1 agreement, loss by position), an lm-eval adapter, a long-context
suite, lm-eval ratio tables and HTML run reports. See docs/evaluation.md."""

from .quality import compare_models, loss_by_position

__all__ = ["compare_models", "loss_by_position"]
