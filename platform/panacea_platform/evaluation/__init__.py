"""Evaluation: batched generation and harm judges on Ray Data, harmful score and task accuracy."""
