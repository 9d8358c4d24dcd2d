"""Panacea research platform: harmful fine-tuning defences on Ray, DeepSpeed and MLflow."""

__version__ = "0.1.0"
