"""The jobs a user runs: the main job (align, attack and defend, evaluate, report) and its comparison
tables with paired differences. Studies (the paper's tables as grids of runs) are sweeps and live
beside them (search/study.py); the eps-per-layer analysis is a component every training run publishes
(analysis.py)."""
