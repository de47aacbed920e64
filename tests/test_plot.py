"""Figures carry the numbers of the tables: lines, points, bands, stages and labels, not pixels."""

from __future__ import annotations

import json

import matplotlib as mpl
import numpy as np
import pytest
from helpers import summarise, synthetic_tokens, write_run

from internal_policy.cli import main
from internal_policy.errors import InputError
from internal_policy.plot import (
    DEPTH_AXIS,
    LAYER_AXIS,
    Run,
    compare_figure,
    cosine_figure,
    delta_figure,
    flow_figure,
    heatmap_figure,
    lens_figure,
    plot_run,
    plot_runs,
    stages_figure,
    token_label,
)
from internal_policy.stages import segment

EIC = np.array([2.0, 1.2, 0.6, 0.02, -0.03, 0.01, -0.8, -2.5])  # exploration 1-3, integration 4-6, convergence 7-8


def by_gid(fig, gid):
    """Artists of a figure with this gid (the figure functions tag what they draw)."""
    return [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]


def legend_texts(fig):
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def col(summary, component, column):
    """Independent read of a summary column: a plain loop over rows, ordered by layer."""
    rows = sorted((r.layer, getattr(r, column)) for r in summary.itertuples() if r.component == component)
    return np.array([v for _, v in rows])


@pytest.fixture(scope="module")
def tokens():
    return synthetic_tokens(n_layers=8, n_records=3, n_positions=9, ffn_delta=EIC, seed=3)


@pytest.fixture(scope="module")
def run(tokens):
    summary = summarise(tokens)
    return Run(summary, label="tiny", vocab_size=512, stages=segment(col(summary, "ffn", "delta")))


def test_flow_one_line_per_model_with_3L_plus_1_points(run):
    other = Run(summarise(synthetic_tokens(n_layers=5, seed=9)), label="five", vocab_size=1000)
    before = dict(mpl.rcParams)
    fig = flow_figure([run, other])
    assert dict(mpl.rcParams) == before  # the seaborn style stays local to the figure
    for r in (run, other):
        (line,) = by_gid(fig, f"flow:{r.label}")
        x, y = line.get_data()
        L = r.n_layers
        assert len(x) == 3 * L + 1
        h, a, f = (col(r.summary, c, "entropy") for c in ("layer", "attn", "ffn"))
        expected = [h[0]]
        for layer in range(1, L + 1):
            expected += [a[layer - 1], f[layer - 1], h[layer]]
        np.testing.assert_allclose(y, expected)
        np.testing.assert_allclose(x[::3], np.arange(L + 1))  # H_l sits on integer layers
    ax = fig.axes[0]
    hlines = [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert sorted(hlines) == pytest.approx([np.log(512), np.log(1000)])
    assert ax.get_ylabel() == "entropy (nats)" and ax.get_xlabel() == LAYER_AXIS
    assert {"tiny", "five", "ln|V| = 6.24 (|V| = 512)", "attention A_l"} <= set(legend_texts(fig))


def test_delta_lines_bands_zero_line_stages_and_boundary(run):
    fig = delta_figure(run)
    top, bottom = fig.axes[:2]
    assert top.get_ylabel() == "ΔH_ATTN (nats)" and bottom.get_ylabel() == "ΔH_FFN (nats)"
    assert bottom.get_xlabel() == LAYER_AXIS
    for comp in ("attn", "ffn"):
        (line,) = by_gid(fig, f"{comp}:tiny")
        np.testing.assert_allclose(line.get_xdata(), np.arange(1, 9))
        np.testing.assert_allclose(line.get_ydata(), col(run.summary, comp, "delta"))
        # the band is mean ± 1.96 sd / sqrt(n): compare its vertical extent at each layer
        (poly,) = by_gid(fig, f"band:{comp}:tiny")
        verts = poly.get_paths()[0].vertices
        half = 1.96 * col(run.summary, comp, "delta_std") / np.sqrt(col(run.summary, comp, "n_tokens"))
        for i, layer in enumerate(range(1, 9)):
            ys = verts[np.isclose(verts[:, 0], layer), 1]
            assert ys.max() == pytest.approx(line.get_ydata()[i] + half[i])
            assert ys.min() == pytest.approx(line.get_ydata()[i] - half[i])
    assert len(by_gid(fig, "zero")) == 2 and all(z.get_linestyle() == "--" for z in by_gid(fig, "zero"))
    # stages shaded exactly over their layers (± 0.5), on both panels
    spans = {"exploration": (1, 3), "integration": (4, 6), "convergence": (7, 8)}
    assert run.stages.spans() == spans
    for name, (first, last) in spans.items():
        patches = by_gid(fig, f"stage:{name}")
        assert len(patches) == 2
        for p in patches:
            assert (p.get_x(), p.get_x() + p.get_width()) == pytest.approx((first - 0.5, last + 0.5))
    assert [b.get_xdata()[0] for b in by_gid(fig, "boundary:tiny")] == [3, 3]
    assert {"exploration stage", "boundary layer 3 (BuPO)"} <= set(legend_texts(fig))
    assert "95 % CI" in fig.get_suptitle()


def test_std_band_and_no_shading_for_several_runs(run):
    other = Run(summarise(synthetic_tokens(n_layers=8, seed=4)), label="other")
    fig = delta_figure([run, other], band_kind="std")
    assert not any(a.get_gid() and a.get_gid().startswith("stage:") for ax in fig.axes for a in ax.get_children())
    (poly,) = by_gid(fig, "band:ffn:other")
    verts = poly.get_paths()[0].vertices
    std = col(other.summary, "ffn", "delta_std")
    mean = col(other.summary, "ffn", "delta")
    ys = verts[np.isclose(verts[:, 0], 4), 1]
    assert (ys.min(), ys.max()) == pytest.approx((mean[3] - std[3], mean[3] + std[3]))
    with pytest.raises(InputError, match="band"):
        delta_figure(run, band_kind="iqr")


def test_cosine_reads_cos_resid(run):
    fig = cosine_figure(run)
    for comp, label in (("attn", "cos(A_l, H_{l-1})"), ("ffn", "cos(F_l, H_{l-1} + A_l)")):
        (line,) = by_gid(fig, f"{comp}:tiny")
        np.testing.assert_allclose(line.get_ydata(), col(run.summary, comp, "cos_resid"))
        assert label in [ax.get_ylabel() for ax in fig.axes]


def test_compare_absolute_and_normalised_depth(run):
    six = Run(summarise(synthetic_tokens(n_layers=6, seed=5)), label="six")
    fig = compare_figure([run, six])
    for r in (run, six):
        (absolute,) = by_gid(fig, f"layer:ffn:delta:{r.label}")
        (depth,) = by_gid(fig, f"depth:ffn:delta:{r.label}")
        layers = np.arange(1, r.n_layers + 1)
        np.testing.assert_allclose(absolute.get_xdata(), layers)
        np.testing.assert_allclose(depth.get_xdata(), layers / r.n_layers)
        np.testing.assert_allclose(depth.get_ydata(), col(r.summary, "ffn", "delta"))
        (h,) = by_gid(fig, f"depth:layer:entropy:{r.label}")
        np.testing.assert_allclose(h.get_xdata(), np.arange(r.n_layers + 1) / r.n_layers)  # includes H_0
    xlabels = {ax.get_xlabel() for ax in fig.axes}
    assert {LAYER_AXIS, DEPTH_AXIS} <= xlabels


def test_heatmap_cells_and_token_labels(tokens):
    fig = heatmap_figure(tokens, record_id="rec1", vocab_size=512, max_positions=6)
    ax = fig.axes[0]
    mesh = next(c for c in ax.collections if hasattr(c, "get_array") and c.get_array() is not None)
    cells = np.asarray(mesh.get_array()).reshape(8 + 1, 6)
    # independent: a loop over the token rows of record 1, layer L in the top row
    for r in tokens.itertuples():
        if r.record_id == "rec1" and r.component == "layer" and r.position < 6:
            assert cells[8 - r.layer, r.position] == pytest.approx(r.entropy)
    words = tokens.loc[(tokens.record_id == "rec1") & (tokens.layer == 0)].sort_values("position")["token"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [token_label(w) for w in words[:6]]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(x) for x in range(8, -1, -1)]
    assert ax.get_ylabel() == LAYER_AXIS and "first 6 of 9 positions" in ax.get_title()
    assert fig.axes[1].get_ylabel() == "entropy (nats)"  # the colour bar
    assert mesh.get_clim() == pytest.approx((0, np.log(512)))
    with pytest.raises(InputError, match="no 'layer' rows for record 'nope'"):
        heatmap_figure(tokens, record_id="nope")


def test_stages_figure_panels_band_and_boundary():
    curves = {"eic": segment(EIC), "flat then down": segment(np.r_[np.zeros(4), -1.0, -2.0]), "up": segment([1.0, 0.5])}
    fig = stages_figure(curves)
    assert sum(ax.axison for ax in fig.axes) == 3  # 2 x 2 grid, the fourth panel hidden
    for ax, (name, st) in zip(fig.axes, curves.items()):
        assert ax.get_title() == f"{name}: boundary {st.boundary_layer or 'none'}"
        assert ax.get_ylabel() == "ΔH_FFN (nats)"
        (line,) = [a for a in ax.get_children() if a.get_gid() == f"ffn:{name}"]
        np.testing.assert_allclose(line.get_ydata(), st.delta_ffn)
        (tol,) = [a for a in ax.get_children() if a.get_gid() == "tolerance"]
        assert (tol.get_y(), tol.get_y() + tol.get_height()) == pytest.approx((-st.tolerance, st.tolerance))
        shaded = {a.get_gid()[6:]: (round(a.get_x() + 0.5, 9), round(a.get_x() + a.get_width() - 0.5, 9))
                  for a in ax.get_children() if (a.get_gid() or "").startswith("stage:")}
        assert shaded == st.spans()
        marks = [a.get_xdata()[0] for a in ax.get_children() if a.get_gid() == f"boundary:{name}"]
        assert marks == ([st.boundary_layer] if st.boundary_layer else [])
    assert [curves[n].boundary_layer for n in curves] == [3, None, 1]


def test_token_label_escapes():
    assert token_label(" w3$") == r"␣w3\$"
    assert token_label("a\nb") == "a↵b"
    assert token_label("") == "∅"
    assert token_label("中") == "<4e2d>"  # no CJK glyphs in DejaVu Sans: shown as code point


def test_plot_run_writes_png_pdf_and_only_figures(tmp_path, tokens):
    run_dir = write_run(tmp_path / "run", tokens)
    paths = plot_run(run_dir)
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{k}.{ext}" for k in ("flow", "delta", "cosine", "heatmap") for ext in ("png", "pdf"))
    assert all(p.parent == run_dir / "figures" and 0 < p.stat().st_size < 300_000 for p in paths)
    assert sorted(p.name for p in run_dir.iterdir()) == ["figures", "run.json", "summary.csv", "tokens.parquet"]
    stages = Run.from_dir(run_dir).stages
    assert stages.exploration == (1, 3) and stages.boundary_layer == 3
    assert Run.from_dir(run_dir).label == "tiny"  # run.json "synthetic/tiny" -> last path part

    # several runs: compare is added, heatmaps numbered, labels made unique, --out required
    twin = write_run(tmp_path / "twin", tokens)
    with pytest.raises(InputError, match="--out"):
        plot_runs([run_dir, twin])
    out = plot_runs([run_dir, twin], tmp_path / "both", kinds=("compare", "heatmap"))
    assert sorted(p.name for p in out) == ["compare.pdf", "compare.png", "heatmap-1.pdf", "heatmap-1.png",
                                           "heatmap-2.pdf", "heatmap-2.png"]

    # a summary-only run (no tokens.parquet, layer component only): "all" draws what it can
    lean = tmp_path / "lean"
    lean.mkdir()
    s = summarise(tokens)
    s.loc[s.component == "layer"].to_csv(lean / "summary.csv", index=False)
    assert plot_run(lean, kinds=("all",)) == []
    with pytest.raises(InputError, match="no 'entropy' for component 'attn'"):
        plot_run(lean, kinds=("flow",))
    with pytest.raises(InputError, match="unknown figure kind"):
        plot_run(run_dir, kinds=("pie",))


def test_cli_plot_and_stages(tmp_path, tokens, capsys):
    run_dir = write_run(tmp_path / "run", tokens)
    assert main(["plot", str(run_dir), "--kind", "delta", "--out", str(tmp_path / "figs")]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["delta.pdf", "delta.png"]
    assert main(["stages", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "boundary layer: 3" in out and "exploration   layers 1-3" in out
    assert main(["stages", str(run_dir), "--rel-tol", "0.9"]) == 0  # tolerance 2.25 nats: all ≈ 0
    assert "boundary layer: none" in capsys.readouterr().out
    assert json.loads((run_dir / "stages.json").read_text())["rel_tol"] == 0.9
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "summary.csv" in capsys.readouterr().err


def test_flow_title_names_the_decoding_of_the_run(tmp_path, tokens):
    """Issue 14: a --final-norm run's flow figure does not say "raw decoding"."""
    raw = write_run(tmp_path / "raw", tokens)
    lens = write_run(tmp_path / "lens", tokens)
    meta = json.loads((lens / "run.json").read_text())
    (lens / "run.json").write_text(json.dumps({**meta, "final_norm": True}))
    assert "raw decoding" in flow_figure(Run.from_dir(raw)).axes[0].get_title()
    title = flow_figure(Run.from_dir(lens)).axes[0].get_title()
    assert "raw decoding" not in title and "final norm" in title


def _with_stats(tokens, seed=0):
    """The synthetic tokens plus an `nll` column and top-3 token lists (as `profile --stats nll --topk 3` writes)."""
    rng = np.random.default_rng(seed)
    words = np.array(["cat", " dog", "$x", "\n", "the", "中"])
    top = [list(rng.choice(words, 3)) for _ in range(len(tokens))]
    return tokens.assign(nll=rng.uniform(0, 8, len(tokens)), topk_tokens=top,
                         topk_probs=[sorted(rng.uniform(0, 0.3, 3), reverse=True) for _ in range(len(tokens))])


def _summary_with(tokens, column):
    summary = summarise(tokens)
    means = tokens.groupby(["layer", "component"])[column].agg(["mean", "std", "size"]).reset_index()
    means.columns = ["layer", "component", column, f"{column}_std", f"{column}_n"]
    return summary.merge(means, on=["layer", "component"])


def test_lens_cells_are_top1_tokens_coloured_by_the_statistic(tokens):
    rich = _with_stats(tokens)
    fig = lens_figure(rich, record_id="rec2", stat="nll", max_positions=5)
    ax = fig.axes[0]
    mesh = next(c for c in ax.collections if hasattr(c, "get_array") and c.get_array() is not None)
    cells = np.asarray(mesh.get_array()).reshape(8 + 1, 5)
    texts = {(round(t.get_position()[0] - 0.5), round(t.get_position()[1] - 0.5)): t.get_text() for t in ax.texts}
    seen = 0
    for r in rich.itertuples():  # independent: a loop over the token rows, layer L in the top row
        if r.record_id == "rec2" and r.component == "layer" and r.position < 5:
            assert cells[8 - r.layer, r.position] == pytest.approx(r.nll)
            assert texts[(r.position, 8 - r.layer)] == token_label(r.topk_tokens[0])
            seen += 1
    assert seen == 5 * 9 and len(texts) == seen
    assert fig.axes[1].get_ylabel() == "NLL of the next token (nats)"
    assert "Logit lens" in ax.get_title() and "first 5 of 9 positions" in ax.get_title()
    with pytest.raises(InputError, match="--topk 1"):
        lens_figure(tokens)
    with pytest.raises(InputError, match="no 'kl_out' column; profile with --stats kl_out"):
        lens_figure(rich, stat="kl_out")


def test_flow_compare_and_heatmap_show_the_chosen_statistic(tokens):
    rich = _with_stats(tokens)
    run = Run(_summary_with(rich, "nll"), label="tiny", vocab_size=512)
    fig = flow_figure(run, stat="nll")
    (line,) = by_gid(fig, "flow:tiny")
    h, a, f = (col(run.summary, c, "nll") for c in ("layer", "attn", "ffn"))
    expected = [h[0]] + [v for layer in range(1, 9) for v in (a[layer - 1], f[layer - 1], h[layer])]
    np.testing.assert_allclose(line.get_ydata(), expected)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "NLL of the next token (nats)" and ax.get_title().startswith("nll flow")
    assert not [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]  # no ln|V| line for an NLL
    other = Run(_summary_with(_with_stats(synthetic_tokens(n_layers=5, seed=9), seed=1), "nll"), label="five")
    fig = compare_figure([run, other], stat="nll")
    assert len(fig.axes) == 2  # one row: the statistic of H_l against layer and depth
    (depth,) = by_gid(fig, "depth:layer:nll:five")
    np.testing.assert_allclose(depth.get_ydata(), col(other.summary, "layer", "nll"))
    assert fig.axes[0].get_ylabel() == "NLL of the next token (nats) of H_l"
    fig = heatmap_figure(rich, record_id="rec0", stat="nll", max_positions=4)
    mesh = next(c for c in fig.axes[0].collections if hasattr(c, "get_array") and c.get_array() is not None)
    cells = np.asarray(mesh.get_array()).reshape(9, 4)
    for r in rich.itertuples():
        if r.record_id == "rec0" and r.component == "layer" and r.position < 4:
            assert cells[8 - r.layer, r.position] == pytest.approx(r.nll)
    assert fig.axes[1].get_ylabel() == "NLL of the next token (nats)"


def test_plot_runs_lens_and_stat_options(tmp_path, tokens, capsys, monkeypatch):
    rich = _with_stats(tokens)
    run_dir = write_run(tmp_path / "rich", rich)
    _summary_with(rich, "nll").to_csv(run_dir / "summary.csv", index=False)
    reads = []
    real = Run.tokens
    monkeypatch.setattr(Run, "tokens", lambda self: reads.append(self.label) or real(self))
    names = sorted(p.name for p in plot_run(run_dir, tmp_path / "all"))
    assert len(reads) == 1  # the heatmap and the lens share one read of tokens.parquet
    monkeypatch.undo()
    assert names == sorted(f"{k}.{e}" for k in ("flow", "delta", "cosine", "heatmap", "lens") for e in ("png", "pdf"))
    plain = write_run(tmp_path / "plain", tokens)  # no top-k tokens: "all" skips the lens figure
    assert "lens.png" not in {p.name for p in plot_run(plain, tmp_path / "plain-figs")}
    assert main(["plot", str(run_dir), "--kind", "lens", "--stat", "nll", "--record", "rec1",
                 "--out", str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["lens.pdf", "lens.png"]
    assert main(["plot", str(plain), "--kind", "lens", "--out", str(tmp_path / "x")]) == 2
    assert "--topk" in capsys.readouterr().err
    assert main(["plot", str(plain), "--kind", "flow", "--stat", "rank", "--out", str(tmp_path / "x")]) == 2
    assert "summary has no 'rank'" in capsys.readouterr().err
