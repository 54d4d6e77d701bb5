"""The toptheta Python module against numpy references written here from design.md §1.

Run by CTest (tests/run.sh) with the built module on PYTHONPATH:
    PYTHONPATH=build/examples/python python3 -m pytest -q tests/python
"""
import json

import numpy as np
import pytest

import toptheta as tt


def group_of(q, k):
    return q.shape[1] // k.shape[1]


def score_rows(q, k, h, past, causal):
    """a_ij = <q_i, k_j> / sqrt(d) of query head h, and each row's visible length L_i."""
    d = q.shape[2]
    a = (q[:, h, :].astype(np.float64) @ k[:, h // group_of(q, k), :].astype(np.float64).T) / np.sqrt(d)
    lengths = [past + i + 1 if causal else k.shape[0] for i in range(q.shape[0])]
    return a, lengths


def reference_dense(q, k, v, past=0, causal=True):
    out = np.zeros(q.shape, dtype=np.float64)
    for h in range(q.shape[1]):
        a, lengths = score_rows(q, k, h, past, causal)
        values = v[:, h // group_of(q, k), :].astype(np.float64)
        for i, length in enumerate(lengths):
            p = np.exp(a[i, :length] - a[i, :length].max())
            out[i, h] = (p / p.sum()) @ values[:length]
    return out


def reference_sparse(q, k, v, keep_of_row, past=0, causal=True, v_mean=True, renormalise=False):
    """o_i = Σ_{j∈S_i} P_ij v_j + (1 - Σ_{j∈S_i} P_ij) vbar(L_i) with P the full softmax (renormalise: the kept P
    rescaled to sum to 1, no V mean); S_i = keep_of_row(P_i, a_i, h), all keys when L_i <= k. Returns the outputs
    and the kept count per query head."""
    out = np.zeros(q.shape, dtype=np.float64)
    kept = np.zeros(q.shape[1], dtype=np.int64)
    for h in range(q.shape[1]):
        a, lengths = score_rows(q, k, h, past, causal)
        values = v[:, h // group_of(q, k), :].astype(np.float64)
        for i, length in enumerate(lengths):
            row = a[i, :length]
            p = np.exp(row - row.max())
            p /= p.sum()
            s = keep_of_row(p, row, h)
            kept[h] += s.sum()
            weights = np.where(s, p, 0.0)
            if renormalise:
                weights /= weights.sum()
            out[i, h] = weights @ values[:length]
            if v_mean:
                out[i, h] += (1.0 - weights.sum()) * values[:length].mean(axis=0)
    return out, kept


def top_theta_rule(theta, k):
    def keep(p, row, h):
        if len(p) <= k:
            return np.ones(len(p), dtype=bool)
        s = p > theta[h]
        if not s.any():  # a row is never empty: its max-score key (the larger position on ties)
            s[len(row) - 1 - np.argmax(row[::-1])] = True
        return s
    return keep


def top_k_rule(k):
    def keep(p, row, h):
        if len(p) <= k:
            return np.ones(len(p), dtype=bool)
        order = np.lexsort((-np.arange(len(row)), -row))  # largest score first, then the larger position
        s = np.zeros(len(row), dtype=bool)
        s[order[:k]] = True
        return s
    return keep


def random_layer(rng, n_q, n_kv, q_heads, kv_heads, d, dtype, spread=3.0):
    q = (rng.standard_normal((n_q, q_heads, d)) * spread).astype(dtype)
    k = rng.standard_normal((n_kv, kv_heads, d)).astype(dtype)
    v = rng.standard_normal((n_kv, kv_heads, d)).astype(dtype)
    return q, k, v


TOLERANCE = {np.float32: 2e-5, np.float64: 1e-11}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_dense_equals_the_reference_in_prefill_and_decode(dtype, q_heads, kv_heads):
    rng = np.random.default_rng(1)
    q, k, v = random_layer(rng, 37, 37, q_heads, kv_heads, 32, dtype)
    out = tt.dense_attention(q, k, v)  # causal prefill
    assert out.dtype == dtype and out.shape == q.shape
    np.testing.assert_allclose(out, reference_dense(q, k, v), atol=TOLERANCE[dtype], rtol=0)
    step = tt.dense_attention(q[-1:], k, v, past=36)  # the decode step of the last token
    np.testing.assert_allclose(step, reference_dense(q[-1:], k, v, past=36), atol=TOLERANCE[dtype], rtol=0)
    full = tt.dense_attention(q[:3], k, v, causal=False)
    np.testing.assert_allclose(full, reference_dense(q[:3], k, v, causal=False), atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_theta_probability_equals_the_reference_and_counts_what_it_keeps(dtype):
    rng = np.random.default_rng(2)
    q, k, v = random_layer(rng, 96, 300, 8, 2, 64, dtype)
    theta = [0.02, 0.01, 0.005, 0.002, 0.03, 0.015, 0.008, 0.001]
    thresholds = tt.LayerThresholds.uniform(16, "probability", theta)
    stats = tt.AttentionStats()
    past = 300 - 96
    out = tt.top_theta_attention(q, k, v, thresholds, past=past, stats=stats)
    expected, kept = reference_sparse(q, k, v, top_theta_rule(theta, 16), past=past)
    np.testing.assert_allclose(out, expected, atol=TOLERANCE[dtype] * 4, rtol=0)
    assert stats.elements_kept == list(kept)
    assert stats.elements_visible == [sum(range(past + 1, 301))] * 8
    assert 0 < stats.kept_fraction() < 0.5
    assert stats.rows == 96 * 8

    plain = tt.top_theta_attention(q, k, v, thresholds, past=past, v_mean=False)
    expected_plain, _ = reference_sparse(q, k, v, top_theta_rule(theta, 16), past=past, v_mean=False)
    np.testing.assert_allclose(plain, expected_plain, atol=TOLERANCE[dtype] * 4, rtol=0)


def test_top_theta_takes_the_v_prefix_sum_an_engine_keeps():
    rng = np.random.default_rng(3)
    q, k, v = random_layer(rng, 1, 500, 4, 2, 32, np.float64)
    thresholds = tt.LayerThresholds.uniform(8, "probability", [0.01] * 4)
    prefix = v[:499].sum(axis=0)  # [kv_heads, d]: Σ_{j<past} v_j
    with_prefix = tt.top_theta_attention(q, k, v, thresholds, past=499, value_prefix_sum=prefix)
    without = tt.top_theta_attention(q, k, v, thresholds, past=499)
    np.testing.assert_allclose(with_prefix, without, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="value_prefix_sum"):
        tt.top_theta_attention(q, k, v, thresholds, past=499, value_prefix_sum=prefix[:1])


def test_top_k_equals_the_reference():
    rng = np.random.default_rng(4)
    q, k, v = random_layer(rng, 20, 120, 4, 4, 16, np.float64)
    out = tt.top_k_attention(q, k, v, 10, past=100)
    expected, kept = reference_sparse(q, k, v, top_k_rule(10), past=100, v_mean=False, renormalise=True)
    np.testing.assert_allclose(out, expected, atol=1e-11, rtol=0)


def test_strided_arrays_are_read_in_place_and_out_is_written_in_place():
    rng = np.random.default_rng(5)
    q, k, v = random_layer(rng, 9, 40, 4, 2, 16, np.float32)
    cache = np.zeros((40, 2, 2, 16), dtype=np.float32)  # an engine's [tokens, kv_heads, (k, v), d] cache
    cache[:, :, 0], cache[:, :, 1] = k, v
    out = np.full((9, 4, 16), np.nan, dtype=np.float32)
    returned = tt.dense_attention(q, cache[:, :, 0], cache[:, :, 1], out, past=31)
    assert returned is out or np.shares_memory(returned, out)
    np.testing.assert_allclose(out, reference_dense(q, k, v, past=31), atol=2e-5, rtol=0)
    # Fortran-ordered K (head_dim values not contiguous) is copied first, with the same result.
    fortran = tt.dense_attention(q, np.asfortranarray(k), v, past=31)
    np.testing.assert_array_equal(fortran, out)


def test_reversed_and_foreign_byte_order_arrays_are_converted_not_refused():
    rng = np.random.default_rng(10)
    q, k, v = random_layer(rng, 6, 6, 2, 1, 8, np.float64)
    expected = reference_dense(q[::-1], k[::-1], v)
    np.testing.assert_allclose(tt.dense_attention(q[::-1], k[::-1], v), expected, atol=1e-12, rtol=0)
    swapped = q[::-1].astype(q.dtype.newbyteorder(">"))
    np.testing.assert_allclose(tt.dense_attention(swapped, k[::-1], v), expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="toptheta: out: expected head_dim values contiguous"):
        tt.dense_attention(q, k, v, np.zeros_like(q)[::-1])


def test_top_k_takes_calibrated_denominator_terms_from_thresholds():
    rng = np.random.default_rng(11)
    q, k, v = random_layer(rng, 1, 64, 2, 2, 8, np.float64)
    terms = tt.LayerThresholds.uniform(4, "raw_score", [0.0, 0.0], denominator_term_per_head=[0.5, 2.0])
    out = tt.top_k_attention(q, k, v, 4, past=63, denominator="calibrated", thresholds=terms)
    for h, c in enumerate([0.5, 2.0]):  # o = Σ_kept exp(a - m) v / (Σ_kept exp(a - m) + c)
        a, _ = score_rows(q, k, h, 63, True)
        row = a[0]
        kept = np.argsort(-row, kind="stable")[:4]
        weights = np.exp(row[kept] - row.max())
        np.testing.assert_allclose(out[0, h], weights @ v[kept, h] / (weights.sum() + c), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="options.thresholds"):
        tt.top_k_attention(q, k, v, 4, past=63, denominator="calibrated")


def test_bad_input_raises_value_error_naming_the_argument():
    rng = np.random.default_rng(6)
    q, k, v = random_layer(rng, 4, 8, 4, 2, 16, np.float32)
    with pytest.raises(ValueError, match="toptheta: q: expected a float32 or float64 array"):
        tt.dense_attention(q.astype(np.int32), k, v)
    with pytest.raises(ValueError, match="toptheta: k: expected a \\[tokens, heads, head_dim\\] array"):
        tt.dense_attention(q, k[:, 0], v)
    with pytest.raises(ValueError, match="toptheta: "):
        tt.dense_attention(q, k[:, :, :8], v)  # head_dim of k differs from q's
    with pytest.raises(ValueError, match="toptheta: out: expected a writable array"):
        out = np.zeros_like(q)
        out.flags.writeable = False
        tt.dense_attention(q, k, v, out)
    with pytest.raises(ValueError, match="toptheta: thresholds"):
        tt.top_theta_attention(q, k, v, tt.LayerThresholds.uniform(4, "probability", [0.1] * 3))
    with pytest.raises(ValueError, match="toptheta: space"):
        tt.LayerThresholds.uniform(4, "probabilities", [0.1] * 4)
    with pytest.raises(ValueError, match="toptheta: denominator"):
        tt.top_k_attention(q, k, v, 2, denominator="exactly")
    with pytest.raises(ValueError, match="toptheta: k: expected an array of real numbers"):
        tt.dense_attention(q, np.full(k.shape, "x"), v)
    with pytest.raises(ValueError, match="toptheta: v: expected an array of real numbers"):
        tt.dense_attention(q, k, v.astype(np.complex64))
    with pytest.raises(ValueError, match="toptheta: threads"):
        tt.dense_attention(q, k, v, threads=2**31 - 1)
    with pytest.raises(ValueError, match="toptheta: k.tokens"):
        tt.dense_attention(q, k, v, past=2**63 - 2)  # past + rows would overflow
    prefix = v.sum(axis=0, dtype=np.float64)
    with pytest.raises(ValueError, match="toptheta: value_prefix_sum: expected a \\[kv_heads, head_dim\\]"):
        tt.top_theta_attention(q, k, v, tt.LayerThresholds.uniform(4, "probability", [0.1] * 4), past=4,
                               value_prefix_sum=prefix.T.copy())
    calibrator = tt.Calibrator(layers=1, q_heads=1, kv_heads=1, head_dim=16, space="raw_score", k=[4])
    with pytest.raises(ValueError, match="toptheta: scores: expected a 2-d array"):
        calibrator.observe_rows(0, 0, np.zeros(10))


def test_a_row_without_a_softmax_comes_out_nan():
    rng = np.random.default_rng(7)
    q, k, v = random_layer(rng, 3, 8, 2, 2, 16, np.float64)
    q[1, 0, 0] = np.nan
    out = tt.dense_attention(q, k, v, past=5)
    assert np.isnan(out[1, 0]).all()
    assert np.isfinite(out[0]).all() and np.isfinite(out[2]).all() and np.isfinite(out[1, 1]).all()


def test_calibrator_tables_the_mean_of_the_rows_k_plus_first_largest_and_the_file_round_trips(tmp_path):
    rng = np.random.default_rng(8)
    layers, heads, k, length = 2, 2, 8, 40
    calibrator = tt.Calibrator(layers=layers, q_heads=heads, kv_heads=1, head_dim=16, space="raw_score", k=[k])
    scores = {}
    for layer in range(layers):
        for head in range(heads):
            rows = rng.standard_normal((50, length)) * (1 + head)
            calibrator.observe_rows(layer, head, rows)
            scores[layer, head] = rows
    assert calibrator.rows_used == layers * heads * 50
    table = calibrator.table("mean_of_thresholds")
    assert table.layers == layers and table.space == "raw_score" and table.k(0) == k
    for (layer, head), rows in scores.items():
        expected = np.sort(rows, axis=1)[:, -(k + 1)].mean()  # each row's (k+1)-th largest, averaged
        column = table.layer(layer).lengths.index(length)
        assert table.layer(layer).theta[head, column] == pytest.approx(expected, rel=1e-12)

    path = tmp_path / "thresholds.json"
    tt.save_thresholds(table, str(path))
    document = json.loads(path.read_text())
    assert document["format"] == "toptheta-thresholds"
    loaded = tt.load_thresholds(str(path))
    for layer in range(layers):
        np.testing.assert_array_equal(loaded.layer(layer).theta, table.layer(layer).theta)
    assert tt.ThresholdTable.from_json(table.to_json()).to_json() == table.to_json()
    with pytest.raises(ValueError, match="toptheta: "):
        tt.load_thresholds(str(tmp_path / "missing.json"))


def test_calibrators_merge_to_the_calibration_of_all_their_rows():
    rng = np.random.default_rng(9)
    rows = rng.standard_normal((60, 100))
    options = dict(layers=1, q_heads=1, kv_heads=1, head_dim=8, space="probability", k=[10])
    whole, first, second = (tt.Calibrator(**options) for _ in range(3))
    whole.observe_rows(0, 0, rows)
    first.observe_rows(0, 0, rows[:25])
    second.observe_rows(0, 0, rows[25:])
    first.merge(second)
    np.testing.assert_array_equal(first.table("count_matched").layer(0).theta,
                                  whole.table("count_matched").layer(0).theta)
    with pytest.raises(ValueError, match="toptheta: "):
        whole.merge(tt.Calibrator(**{**options, "space": "raw_score"}))


def test_the_readme_example_writes_a_file_the_library_loads(tmp_path):
    import pathlib
    import runpy
    import sys

    path = tmp_path / "thresholds.json"
    script = pathlib.Path(__file__).resolve().parents[2] / "examples" / "python" / "calibrate_from_scores.py"
    argv = sys.argv
    sys.argv = [str(script), str(path)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    table = tt.load_thresholds(str(path))
    assert table.layers == 2 and table.method == "budget_matched" and table.space == "probability"
    theta = table.layer(0).theta
    assert np.all(theta == theta[0, 0]) and 0 < theta[0, 0] < 1  # one θ for the layer, a probability


@pytest.mark.parametrize("kind, parameter", [("dense", 0), ("top_theta", 0.01), ("top_k", 12)])
def test_the_module_gives_the_bits_of_the_same_call_made_from_cpp(tmp_path, kind, parameter):
    """examples/python/kernel_reference.cpp calls the kernel from C++ on the same arrays (from files)."""
    import os
    import subprocess

    reference = os.environ.get("TOPTHETA_KERNEL_REFERENCE")
    if not reference:
        pytest.skip("TOPTHETA_KERNEL_REFERENCE (the toptheta_kernel_reference program) is not set; CTest sets it")
    rng = np.random.default_rng(7)
    n_q, n_kv, q_heads, kv_heads, d, past = 5, 200, 8, 2, 64, 195
    q, k, v = random_layer(rng, n_q, n_kv, q_heads, kv_heads, d, np.float32)
    for name, array in (("q", q), ("k", k), ("v", v)):
        array.astype("<f4").tofile(tmp_path / f"{name}.f32")
    (tmp_path / "shape.txt").write_text(f"{n_q} {n_kv} {q_heads} {kv_heads} {d} {past} {parameter}\n")
    subprocess.run([reference, kind, str(tmp_path)], check=True)
    from_cpp = np.fromfile(tmp_path / "out.f32", dtype="<f4").reshape(q.shape)
    if kind == "dense":
        out = tt.dense_attention(q, k, v, past=past, threads=1)
    elif kind == "top_theta":
        thresholds = tt.LayerThresholds.uniform(16, "probability", [parameter] * q_heads)
        out = tt.top_theta_attention(q, k, v, thresholds, past=past, threads=1)
    else:
        out = tt.top_k_attention(q, k, v, parameter, past=past, v_mean=True, threads=1)
    assert np.array_equal(out, from_cpp)
