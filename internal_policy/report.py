"""A run report: one self-contained HTML file per set of profile runs, to open in any browser offline.

For each run it holds the settings (run.json), the EIC stage table (computed from summary.csv; the
run folder is only read), every figure the run's tables support (plot.py's figures, embedded as
base64 PNG) and an interactive token × layer view: a grid of one record (rows = layers 0..L, columns
= token positions) coloured by a statistic, where hovering a cell shows the token, the layer, the
value and, for runs profiled with `--topk K`, the top decoded tokens with their probabilities.
Several runs add a comparison section. Nothing is fetched when the page is viewed: CSS, JS (vanilla)
and data are inline. The page is a Jinja2 template (jinja2 is installed with torch).
Layers are numbered as in the paper: 1..L, 0 = the embedding output.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import __version__
from .errors import InputError
from .runs import TOKENS, atomic_write, read_meta
from .stages import Stages, describe
from .stats import by_name

if TYPE_CHECKING:  # plot.py (matplotlib, seaborn) is imported when a report is written, not with the package
    from .plot import Run

GENERATOR = "internal-policy report"
"""Content of the page's <meta name="generator">: how the tool recognises a file it may overwrite."""
TEMPLATE = "report.html.j2"
DPI = 100
SETTING_GROUPS = {
    "model": ("model", "model_type", "n_layers", "vocab_size", "d_model", "dtype", "device", "world_size"),
    "counts": ("n_records", "n_tokens", "skipped_empty_responses", "truncated_tokens", "seconds"),
    "fingerprints": ("records_sha256", "weights_sha256", "chat_template_sha256"),
    "provenance": ("version", "status", "layer_numbering"),
}
"""How run.json's keys are grouped on the page; every other key is shown under "settings"."""
CAPTIONS = {
    "flow": "Entropy flow through the layers (paper Fig. 2): H_{l-1} → A_l → F_l → H_l.",
    "delta": "Entropy change per module, ΔH_ATTN and ΔH_FFN (paper Fig. 3), EIC stages shaded.",
    "cosine": "Residual cosine similarity of the module writes (paper Fig. 12).",
    "heatmap": "The statistic per token and layer of the first record shown below.",
    "lens": "Logit lens: the top-1 decoded token per layer and position.",
    "compare": "The runs compared, against absolute layer (left) and normalised depth (right).",
    "heads": "The statistic of each attention head's write per layer (mean over tokens), EIC stages above.",
}
"""One caption per figure kind of `plot.KINDS` (a figure "heatmap-2" takes the caption of "heatmap")."""
VIEW_COLUMNS = ("record_id", "position", "token", "layer")


def _png(fig) -> str:
    """A figure as a base64 PNG data URI (so the page needs no other file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figures(runs: list[Run], kinds: Sequence[str], stat: str, record_id: str | None = None) -> list[dict]:
    """Every figure of `kinds` ("all" = those the runs support), embedded, with its caption."""
    from .plot import figures

    return [{"name": name, "caption": CAPTIONS[name.split("-")[0]], "src": _png(fig)}
            for name, fig in figures(runs, kinds, record_id, stat)]


def _show(value: object) -> str:
    """A run.json value as page text."""
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "(none)"
    if isinstance(value, dict):
        return json.dumps(value) if value else "(none)"
    return "(none)" if value is None else str(value)


def settings_table(meta: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    """run.json as (group, [(key, shown value)]) in page order; unknown keys go to "settings"."""
    grouped = {k for keys in SETTING_GROUPS.values() for k in keys}
    groups = {name: [(k, _show(meta[k])) for k in keys if k in meta] for name, keys in SETTING_GROUPS.items()}
    groups["settings"] = [(k, _show(v)) for k, v in meta.items() if k not in grouped]
    order = ("model", "settings", "counts", "fingerprints", "provenance")
    return [(name, groups[name]) for name in order if groups[name]]


def stage_table(stages: Stages) -> dict:
    """The stage table of a run: one row per layer (ΔH_FFN, label, stage) and describe()'s summary lines."""
    sign = {1: "+", 0: "0", -1: "−"}
    rows = [{"layer": layer, "delta": f"{d:.4f}", "label": sign[lab], "stage": stages.stage_of(layer)}
            for layer, (d, lab) in enumerate(zip(stages.delta_ffn, stages.labels), start=1)]
    lines = describe(stages).splitlines()  # first line: the tolerance; last: the boundary layer
    spans = [f"{name} layers {first}–{last}" for name, (first, last) in stages.spans().items()]
    return {"rows": rows, "tolerance": lines[0], "spans": spans, "boundary": lines[-1]}


def _finite(value: float) -> float | None:
    """JSON has no NaN: a missing value becomes null."""
    return float(value) if math.isfinite(value) else None


def _decoder(meta: dict):
    """A function id -> text using the run's tokenizer (local files only), or None if it cannot be loaded."""
    from .models import DEFAULT_MODEL, default_model_path

    name = str(meta.get("model") or "")
    path = default_model_path() if name.split(" ")[0] == DEFAULT_MODEL else name
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # any failure (no such folder, offline hub, broken files) means: show ids
        return None
    return lambda i: tokenizer.decode([int(i)])


def token_view(tokens_path: Path, meta: dict, stat: str, records: int, max_positions: int) -> dict:
    """Data of the token × layer view: the first `records` records, their first `max_positions` positions,
    `stat` of H_l per (layer, position) and, where stored, the top-k tokens with probabilities.

    Top-k texts are those the profile stored (`topk_tokens`, decoded by the run's tokenizer); without
    them the ids are decoded with the tokenizer run.json names, else shown as "#id".
    """
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(tokens_path).names)
        wanted = [c for c in (*VIEW_COLUMNS, stat, "topk_ids", "topk_probs", "topk_tokens") if c in names]
        table = pd.read_parquet(tokens_path, columns=wanted, filters=[("component", "==", "layer")])
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"{tokens_path} is damaged ({str(err).splitlines()[0]}); profile the run again") from None
    missing = [c for c in (*VIEW_COLUMNS, stat) if c not in names]
    if missing:
        raise InputError(f"{tokens_path} lacks columns {missing}; profile again (with --stats {stat})")
    has_topk = "topk_probs" in names and "topk_ids" in names
    decode, note = None, None
    if has_topk and "topk_tokens" not in names:
        decode = _decoder(meta)
        if decode is None:
            note = f"top tokens shown as ids: the tokenizer of {meta.get('model')!r} could not be loaded"
    record_ids = table["record_id"].astype(str)
    ids = list(dict.fromkeys(record_ids))
    out = []
    for record_id in ids[:records]:
        rows = table.loc[record_ids == record_id]
        positions = sorted(rows["position"].unique())
        shown = positions[:max_positions]
        rows = rows.loc[rows["position"].isin(shown)].set_index(["layer", "position"]).sort_index()
        layers = sorted(rows.index.get_level_values("layer").unique())
        words = rows.reset_index().drop_duplicates("position").set_index("position")["token"].astype(str)
        grid = rows[stat].unstack("position").reindex(index=layers, columns=shown)
        record = {"id": record_id, "positions": [int(p) for p in shown], "n_positions": len(positions),
                  "tokens": [words[p] for p in shown], "layers": [int(layer) for layer in layers],
                  "values": [[_finite(v) for v in row] for row in grid.to_numpy(dtype=np.float64)]}
        if has_topk:
            record["topk"] = [[_topk(rows, layer, p, decode) for p in shown] for layer in layers]
        out.append(record)
    return {"records": out, "n_records": len(ids), "note": note, "has_topk": has_topk}


def _topk(rows: pd.DataFrame, layer: int, position: int, decode) -> list[list] | None:
    """[(text, probability)] of one cell, most likely first (None where the cell has no row)."""
    if (layer, position) not in rows.index:
        return None
    row = rows.loc[(layer, position)]
    if "topk_tokens" in rows.columns:
        texts = [str(t) for t in row["topk_tokens"]]
    else:
        texts = [decode(i) if decode else f"#{int(i)}" for i in row["topk_ids"]]
    return [[text, float(p)] for text, p in zip(texts, row["topk_probs"])]


def _colour_scale(stat: str, vocab_size: int | None, records: list[dict]) -> dict:
    """Colour limits (as the heatmap figure's; data range where the statistic has none) and viridis as 256 hex."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    from .plot import colour_range

    vmin, vmax = colour_range(stat, vocab_size)
    values = [v for r in records for row in r["values"] for v in row if v is not None] or [0.0, 1.0]
    vmin = min(values) if vmin is None else float(vmin)
    vmax = max(values) if vmax is None else float(vmax)
    colours = [to_hex(c) for c in colormaps["viridis"](np.linspace(0, 1, 256))]
    return {"vmin": vmin, "vmax": vmax if vmax > vmin else vmin + 1.0, "colours": colours}


def _check_out(out: Path) -> None:
    """Refuse an --out this tool did not write (an existing file without our generator mark, a folder)."""
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name such as {out / 'report.html'}")
    if out.exists():
        try:
            head = out.read_bytes()[:4096].decode("utf-8", errors="replace")
        except OSError as err:
            raise InputError(f"cannot read --out {out} ({err.strerror}); give another file name") from None
        if f'<meta name="generator" content="{GENERATOR}">' not in head:
            raise InputError(f"--out {out} exists and is not a report written by internal-policy; "
                             "give another file name (nothing of yours is overwritten)")


def _run_section(index: int, run: Run, run_dir: Path, meta: dict, stat: str, records: int,
                 max_positions: int) -> dict:
    """Everything the page shows for one run."""
    section = {"index": index, "label": run.label, "path": str(run_dir), "settings": settings_table(meta),
               "stages": stage_table(run.stages) if run.stages else None, "view": None, "view_note": None}
    has_layers = "layer" in set(run.summary["component"])
    if run.tokens_path is None or not run.tokens_path.is_file():
        section["view_note"] = "no token × layer view: this run has no tokens.parquet (profiled with --no-tokens)"
    elif not has_layers:
        section["view_note"] = "no token × layer view: this run has no 'layer' component (profile with it)"
    else:
        view = token_view(run.tokens_path, meta, stat, records, max_positions)
        view.update(_colour_scale(stat, run.vocab_size, view["records"]), stat=stat, stat_label=by_name(stat).label)
        section["view"] = view
    first = section["view"]["records"][0]["id"] if section["view"] and section["view"]["records"] else None
    section["figures"] = _figures([run], ("all",), stat, first)
    return section


def write_report(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    stat: str = "entropy",
    records: int = 3,
    max_positions: int = 64,
) -> Path:
    """Write one self-contained HTML report of the profile runs `run_dirs` to `out`; return its path.

    `stat` colours the token × layer view and is the statistic of the flow, heatmap, lens and compare
    figures; the view embeds the first `records` records and at most `max_positions` positions of
    each (the file stays small). The run folders are only read; a run still running is refused, and
    an existing `out` is replaced only if it is a report this tool wrote (written atomically).
    """
    from jinja2 import Environment, PackageLoader, select_autoescape

    from .plot import Run, drawable, unique_labels

    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise InputError("give at least one RUN folder")
    if records < 1 or max_positions < 1:
        raise InputError(f"--records and --max-positions must be >= 1, got {records} and {max_positions}")
    out = Path(out)
    _check_out(out)
    for d in dirs:
        if not d.is_dir():
            raise InputError(f"run folder {d} does not exist; give a folder written by `internal-policy profile`")
    runs = unique_labels([Run.from_dir(d) for d in dirs], dirs)  # refuses a running or damaged run before drawing
    metas = [read_meta(d, "profile") for d in dirs]  # checked by Run.from_dir: only run.json is read again
    by_name(stat)  # an unknown statistic name is an InputError
    for d, run in zip(dirs, runs):
        if stat not in run.summary.columns:
            raise InputError(f"run {d} has no '{stat}' statistic; choose another --stat or profile with --stats {stat}")
    sections = [_run_section(i, run, d, meta, stat, records, max_positions)
                for i, (run, d, meta) in enumerate(zip(runs, dirs, metas), start=1)]
    shared = [k for k in ("flow", "compare") if len(runs) > 1 and drawable(k, runs)]
    comparison = _figures(runs, shared, stat) if shared else []
    env = Environment(loader=PackageLoader("internal_policy", "templates"), autoescape=select_autoescape(["j2"]))
    page = env.get_template(TEMPLATE).render(
        generator=GENERATOR, version=__version__, runs=sections, comparison=comparison,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), tokens_file=TOKENS,
        records=records, max_positions=max_positions,
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    except OSError as err:
        raise InputError(f"cannot write --out {out} ({err.strerror}); give a file you can write") from None
    return out


__all__ = ["GENERATOR", "settings_table", "stage_table", "token_view", "write_report"]
