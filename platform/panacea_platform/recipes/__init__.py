"""The jobs a user runs: the main job (align, attack and defend, evaluate, report), its comparison
tables with paired differences, and the analysis of eps per layer. Studies (the paper's tables as
grids of runs) are sweeps: search/study.py."""
