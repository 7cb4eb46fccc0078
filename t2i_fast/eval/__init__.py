"""Evaluation: scores for images a generator makes, and for the data they are compared with."""

from t2i_fast.eval.attributes import evaluate, evaluate_dataset, parse_caption, score_image

__all__ = ["evaluate", "evaluate_dataset", "parse_caption", "score_image"]
