"""The jobs a user runs: the main job (align, attack and defend, evaluate, report), its comparison
tables with paired differences, and studies' tables (the paper's tables from a sweep's grid of runs;
the sweep itself, and a study's spec, are search/'s). The eps-per-layer analysis stays a component
(analysis.py): every training run publishes it, and no component imports a recipe."""
