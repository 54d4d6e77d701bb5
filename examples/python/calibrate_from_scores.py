#!/usr/bin/python3
"""Calibrates Top-θ thresholds on captured attention scores and writes the file a C++ engine loads:

    PYTHONPATH=build/examples/python examples/python/calibrate_from_scores.py thresholds.json
"""
import sys

import numpy as np
import toptheta as tt

calibrator = tt.Calibrator(layers=2, q_heads=4, kv_heads=2, head_dim=64, space="probability", k=[32])
rng = np.random.default_rng(0)
for layer in range(2):
    for head in range(4):  # score rows a_ij = <q_i, k_j> / sqrt(d) of this (layer, head), e.g. from a model hook
        calibrator.observe_rows(layer, head, rng.standard_normal((64, 1024)) * 3)
table = calibrator.table("budget_matched")  # one θ per layer, about k = 32 kept per row
tt.save_thresholds(table, sys.argv[1])  # toptheta::load_thresholds(path) reads it in C++
print(f"wrote {sys.argv[1]}: layer 0 θ = {table.layer(0).theta[0, 0]:.3g}")
