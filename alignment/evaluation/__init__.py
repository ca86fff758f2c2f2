"""Evaluation: sampling, metrics, the evaluator and the in-training alignment curve."""
