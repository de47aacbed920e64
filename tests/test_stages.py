"""EIC segmentation on hand-made ΔH_FFN curves, and the run-folder round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import summarise, synthetic_tokens, write_run
from hypothesis import given, settings
from hypothesis import strategies as st

from internal_policy.errors import InputError
from internal_policy.stages import (
    Stages,
    boundary_layer,
    despeckle,
    label_layers,
    run_boundary_layer,
    run_stages,
    segment,
    stages_from_summary,
    write_stages,
)


def qwen_like() -> np.ndarray:
    """Qwen3-4B's reading of Fig. 3: layers 1-6 > 0, 7-26 ≈ 0, 27-36 < 0 (scale -10..+4 nats)."""
    explore = [4.0, 3.1, 2.2, 1.6, 1.1, 0.7]
    rng = np.random.default_rng(1)
    integrate = list(rng.uniform(-0.2, 0.2, 20))
    converge = list(np.linspace(-0.8, -10.0, 10))
    return np.array(explore + integrate + converge)


def test_clean_three_stages_and_boundary():
    st_ = segment(qwen_like())
    assert st_.tolerance == pytest.approx(0.05 * 10.0)  # 5 % of max |ΔH| (10 nats) beats the 0.01 floor
    assert (st_.exploration, st_.integration, st_.convergence) == ((1, 6), (7, 26), (27, 36))
    assert st_.boundary_layer == 6
    assert st_.stage_of(6) == "exploration" and st_.stage_of(7) == "integration" and st_.stage_of(36) == "convergence"


def test_single_noisy_layers_do_not_split_stages():
    curve = qwen_like()
    curve[2] = 0.0  # a flat layer inside exploration
    curve[15] = 1.5  # a spike inside integration
    curve[20] = -2.0  # a dip inside integration
    curve[30] = 0.3  # a flat layer inside convergence
    st_ = segment(curve)
    assert (st_.exploration, st_.integration, st_.convergence) == ((1, 6), (7, 26), (27, 36))
    assert st_.boundary_layer == 6


def test_noisy_first_exploration_layer_after_integration_is_ignored():
    """0 + 0 0 ...: one positive layer among flat ones is noise, not an exploration stage."""
    curve = np.array([0.0, 0.9, 0.0, 0.0, 0.05, -0.02, -1.0, -2.0])
    st_ = segment(curve)
    assert st_.exploration is None and st_.integration == (1, 6) and st_.convergence == (7, 8)
    assert st_.boundary_layer is None


def test_llama_like_weakly_positive_converging_at_last_layer():
    rng = np.random.default_rng(2)
    curve = np.r_[rng.uniform(0.03, 0.2, 27), -0.2]  # Fig. 3 Llama: ±0.2 nats, converges only at layer L
    st_ = segment(curve)
    assert st_.tolerance == pytest.approx(0.01)  # 5 % of 0.2 = 0.01: the absolute floor
    assert (st_.exploration, st_.integration, st_.convergence) == ((1, 27), None, (28, 28))
    assert st_.boundary_layer == 27  # OctoThinker-3B: paper layer 27 of 28


def test_all_positive_boundary_is_capped_below_last_layer():
    st_ = segment(np.linspace(0.5, 0.1, 12))
    assert st_.exploration == (1, 12) and st_.integration is None and st_.convergence is None
    assert st_.boundary_layer == 11


@pytest.mark.parametrize("curve", [-np.linspace(0.1, 3.0, 8), np.r_[np.zeros(5), -np.ones(3)]])
def test_no_exploration_stage_has_no_boundary(curve):
    st_ = segment(curve)
    assert st_.exploration is None and st_.boundary_layer is None
    summary = summarise(synthetic_tokens(n_layers=8, ffn_delta=curve, n_positions=3))
    with pytest.raises(InputError, match="no exploration stage"):
        boundary_layer(summary)


def test_values_exactly_at_the_tolerance_are_flat():
    """The ≈ 0 band is closed: |ΔH| == tol is labelled 0, anything beyond it is not."""
    tol = 0.05
    delta = np.array([tol, -tol, np.nextafter(tol, 1), -np.nextafter(tol, 1), 0.0])
    assert label_layers(delta, tol).tolist() == [0, 0, 1, -1, 0]
    st_ = segment([1.0, 0.05, 0.05, -0.05, -1.0], min_run=1)  # tol = 5 % of 1.0 = 0.05 exactly
    assert st_.tolerance == 0.05 and st_.labels == (1, 0, 0, 0, -1)
    assert (st_.exploration, st_.integration, st_.convergence) == ((1, 1), (2, 4), (5, 5))


def test_fit_ties_are_broken_by_distance_then_by_the_smallest_split():
    """Splits that mislabel as many layers are ranked by how far those layers lie outside their stage's band:
    for [1.0, -0.06, 0.0], integration 2-3 mislabels -0.06 (0.01 outside ≈ 0) and convergence 2-3 mislabels
    0.0 (0.05 outside < -tol), so integration wins ..."""
    st_ = segment([1.0, -0.06, 0.0])
    assert st_.labels == (1, -1, 0)
    assert (st_.exploration, st_.integration, st_.convergence) == ((1, 1), (2, 3), None)
    assert st_.boundary_layer == 1
    # ... and a full tie (one disagreeing layer 1.05 nats off either way) takes the smallest (a, b): all convergence
    st_ = segment([-1.0, 1.0], min_run=1)
    assert (st_.exploration, st_.integration, st_.convergence) == (None, None, (1, 2))
    assert st_.boundary_layer is None


def test_despeckle_keeps_edge_runs_and_fills_interior_single_layers():
    labels = np.array([-1, 1, 1, 0, 1, 1, 0, 0, 1, 0, -1])
    assert despeckle(labels, 2).tolist() == [-1, 1, 1, 1, 1, 1, 0, 0, 0, 0, -1]
    assert despeckle(labels, 1).tolist() == labels.tolist()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 40),
    cuts=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    scale=st.floats(0.05, 20),
    seed=st.integers(0, 2**16),
)
def test_clean_step_curves_are_recovered_exactly(n, cuts, scale, seed):
    """Any ordered E/I/C step curve with values well outside the tolerance band is segmented exactly."""
    a, b = sorted(int(round(c * n)) for c in cuts)
    rng = np.random.default_rng(seed)
    curve = np.r_[rng.uniform(0.5, 1, a), rng.uniform(-0.02, 0.02, b - a), -rng.uniform(0.5, 1, n - b)] * scale
    if a == 0 and b == n:  # a flat curve sets its own scale: only the absolute floor (0.01 nats) can call it ≈ 0
        curve = rng.uniform(-0.009, 0.009, n)
    st_ = segment(curve)
    want = [(1, a), (a + 1, b), (b + 1, n)]
    assert [st_.exploration, st_.integration, st_.convergence] == [w if w[0] <= w[1] else None for w in want]
    assert st_.boundary_layer == (min(a, n - 1) if a else None)
    # stages tile 1..L in order
    covered = [layer for first, last in st_.spans().values() for layer in range(first, last + 1)]
    assert covered == list(range(1, n + 1))


def test_summary_and_run_dir_round_trip(tmp_path):
    curve = qwen_like()[::3]  # 12 layers: 1-2 explore
    tokens = synthetic_tokens(n_layers=12, ffn_delta=curve, n_positions=4)
    summary = summarise(tokens)
    expected = segment(summary.loc[summary.component == "ffn"].sort_values("layer")["delta"].to_numpy())
    assert stages_from_summary(summary) == expected
    assert boundary_layer(summary) == expected.boundary_layer == 2

    run = write_run(tmp_path / "run", tokens)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert run_boundary_layer(run) == 2
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # reading a run writes nothing

    # a stored file with custom parameters is reused while it matches summary.csv ...
    custom = segment(expected.delta_ffn, rel_tol=0.5)
    stored = write_stages(run, custom)
    assert stored == run / "stages.json" and json.loads(stored.read_text())["rel_tol"] == 0.5
    assert run_stages(run) == custom
    # ... and recomputed, with the same parameters, once summary.csv changes (the stale file is left alone)
    write_run(run, synthetic_tokens(n_layers=12, ffn_delta=-np.abs(curve), n_positions=4))
    fresh = run_stages(run)
    assert fresh.rel_tol == 0.5 and fresh.boundary_layer is None
    assert Stages.from_dict(json.loads(stored.read_text())) == custom


def test_bad_inputs_name_the_problem(tmp_path):
    summary = summarise(synthetic_tokens(n_layers=3, n_positions=2))
    with pytest.raises(InputError, match="no 'ffn' rows"):
        stages_from_summary(summary.loc[summary.component != "ffn"])
    with pytest.raises(InputError, match="lacks columns"):
        stages_from_summary(summary.drop(columns="delta"))
    with pytest.raises(InputError, match="NaN"):
        segment([0.1, np.nan, -0.2])
    with pytest.raises(InputError, match="summary.csv"):
        run_stages(tmp_path)
