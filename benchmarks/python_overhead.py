#!/usr/bin/python3
"""What calling a kernel through the toptheta Python module costs over calling it from C++.

    PYTHONPATH=build/examples/python benchmarks/python_overhead.py [--threads N] [--repeats R]

For a decode step of a layer of the suite's shape (Llama-3-8B: 32 query heads, 8 KV heads, head_dim 128;
random float32 q, K and V of n tokens, held in numpy arrays), times `toptheta.top_theta_attention` called from
Python and the same kernel call made R times in C++ on the same arrays (`toptheta._seconds_per_cpp_call`), in
alternation within one process, and prints the medians and their ratio. Probability thresholds θ = 16/n
per head (about 0.9 % of the elements kept on this data), V-mean compensation from the V prefix sum an engine
keeps.
"""
import argparse
import statistics
import time

import numpy as np

import toptheta as tt


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="kernel threads (0: OpenMP's default)")
    parser.add_argument("--repeats", type=int, default=10, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=7, help="timings of each side, alternating")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q_heads, kv_heads, d = 32, 8, 128
    print("| kv | Python call | C++ call | Python / C++ | kept fraction |")
    print("|---:|---:|---:|---:|---:|")
    for n in (4096, 16384, 65536):
        q = rng.standard_normal((1, q_heads, d), dtype=np.float32) * 2
        k = rng.standard_normal((n, kv_heads, d), dtype=np.float32)
        v = rng.standard_normal((n, kv_heads, d), dtype=np.float32)
        thresholds = tt.LayerThresholds.uniform(64, "probability", [16.0 / n] * q_heads)
        prefix = v[: n - 1].sum(axis=0, dtype=np.float64)
        out = np.empty((1, q_heads, d), dtype=np.float32)
        stats = tt.AttentionStats()
        tt.top_theta_attention(q, k, v, thresholds, out, past=n - 1, value_prefix_sum=prefix, stats=stats,
                               threads=args.threads)
        python_times, cpp_times = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(args.repeats):
                tt.top_theta_attention(q, k, v, thresholds, out, past=n - 1, value_prefix_sum=prefix,
                                       threads=args.threads)
            python_times.append((time.perf_counter() - start) / args.repeats)
            cpp_times.append(tt._seconds_per_cpp_call(q, k, v, thresholds, prefix, n - 1, args.repeats, args.threads))
        python, cpp = statistics.median(python_times), statistics.median(cpp_times)
        print(f"| {n} | {python * 1e6:.1f} µs | {cpp * 1e6:.1f} µs | {python / cpp:.3f}x | {stats.kept_fraction():.4f} |")


if __name__ == "__main__":
    main()
