"""Accuracy harness: easy-vqa test-split evaluation of any model, and agreement between two models."""

from eas.evaluation.harness import EvalReport, agreement, evaluate, question_type

__all__ = ["EvalReport", "agreement", "evaluate", "question_type"]
