"""Hyper-parameter search: search spaces (space.py), Ray Tune sweeps (sweep.py), Pareto fronts and reports."""
