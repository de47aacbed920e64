"""The HTML run report: its content against the run's own tables, and the token × layer view in a real browser.

The browser test drives headless Chromium over the DevTools protocol on a pipe (no extra package): it
moves the mouse onto grid cells and reads the tooltip back, so a broken hover handler, a wrong layer or
misaligned top-k lists fail it. Without chromium it skips locally and fails under CI=1.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from helpers import synthetic_tokens, write_run

from internal_policy import profile, write_report
from internal_policy.cli import main
from internal_policy.errors import InputError
from internal_policy.report import GENERATOR, token_view

EIC = np.array([2.0, 1.2, 0.6, 0.02, -0.03, 0.01, -0.8, -2.5])  # exploration 1-3, integration 4-6, convergence 7-8
ODD = '<b>&"x\''  # a token that is also HTML: it must be shown as text
META = {"model_type": "llama", "dtype": "float32", "stats": ["entropy", "topk"], "topk": 3, "chat": {"system": ODD},
        "records_sha256": "ab" * 32, "weights_sha256": "cd" * 32, "chat_template_sha256": None,
        "version": "0.1.0", "status": "complete", "layer_numbering": "paper: 1..L, 0 = embedding output"}


def with_topk(tokens: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    """The synthetic tokens plus top-3 ids, probabilities (distinct, descending) and texts, as `--topk 3` stores."""
    rng = np.random.default_rng(seed)
    ids = [rng.choice(512, 3, replace=False) for _ in range(len(tokens))]
    probs = [np.sort(rng.dirichlet(np.ones(6))[:3])[::-1] for _ in range(len(tokens))]
    return tokens.assign(topk_ids=ids, topk_probs=probs, topk_tokens=[[f"w{i}" for i in row] for row in ids])


def make_run(path, tokens, **meta):
    """A finished run folder with a full run.json."""
    write_run(path, tokens)
    saved = json.loads((path / "run.json").read_text())
    (path / "run.json").write_text(json.dumps({**saved, **META, **meta}))
    return path


@pytest.fixture(scope="module")
def tokens():
    t = with_topk(synthetic_tokens(n_layers=8, n_records=3, n_positions=9, ffn_delta=EIC, seed=3))
    t.loc[t["position"] == 4, "token"] = ODD
    return t


@pytest.fixture(scope="module")
def report(tmp_path_factory, tokens):
    """(run folder, report path, page text) of one run with top-k tokens; 2 records × 6 positions embedded."""
    root = tmp_path_factory.mktemp("report")
    run = make_run(root / "run", tokens)
    out = write_report([run], root / "out" / "report.html", records=2, max_positions=6)
    return run, out, out.read_text(encoding="utf-8")


def view_data(page: str, index: int = 1) -> dict:
    """The JSON the page embeds for one run's token × layer view."""
    block = re.search(rf'id="view-{index}".*?<script type="application/json" class="view-data">(.*?)</script>', page,
                      re.S)
    return json.loads(block.group(1))


def cell(tokens: pd.DataFrame, record: str, layer: int, position: int) -> pd.Series:
    """One row of tokens.parquet (component 'layer'), found by a plain scan."""
    for row in tokens.itertuples():
        if (row.record_id, row.layer, row.position, row.component) == (record, layer, position, "layer"):
            return pd.Series(row._asdict())
    raise KeyError((record, layer, position))


# ---------------------------------------------------------------- the page without a browser


def test_settings_show_every_run_json_value(report):
    run, _, page = report
    meta = json.loads((run / "run.json").read_text())
    rows = {html.unescape(k): html.unescape(v) for k, v in re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", page)}
    expected = {k: (", ".join(map(str, v)) if isinstance(v, list) else json.dumps(v) if isinstance(v, dict)
                    else "(none)" if v is None else str(v)) for k, v in meta.items()}
    assert rows == expected and rows["chat"] == json.dumps({"system": ODD})
    assert "<b>" not in page  # escaped: a value is text, never markup
    assert re.findall(r'data-group="(\w+)"', page) == ["model", "settings", "counts", "fingerprints", "provenance"]


def test_stage_table_matches_the_ffn_curve(report, tokens):
    _, _, page = report
    table = re.search(r'<table class="stages">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r'<tr class="(\w+)"><td class="num">(\d+)</td><td class="num">([-\d.]+)</td><td>(.)</td>'
                      r"<td>(\w+)</td></tr>", table)
    ffn = tokens.loc[tokens["component"] == "ffn"]
    stage = {1: "exploration", 2: "exploration", 3: "exploration", 4: "integration", 5: "integration",
             6: "integration", 7: "convergence", 8: "convergence"}
    assert [int(r[1]) for r in rows] == list(range(1, 9))
    for cls, layer, delta, _, name in rows:
        mean = sum(ffn.loc[ffn["layer"] == int(layer), "delta"]) / len(ffn.loc[ffn["layer"] == int(layer)])
        assert float(delta) == pytest.approx(mean, abs=6e-5)
        assert cls == name == stage[int(layer)]
    assert "boundary layer: 3 (BuPO internal layer; 0-based HF block index 2)" in page


def test_figures_are_embedded_pngs_and_nothing_is_fetched(report):
    _, _, page = report
    figures = re.findall(r'<figure data-kind="(\w+)"><img alt="[^"]*" src="([^"]*)">', page)
    assert [k for k, _ in figures] == ["flow", "delta", "cosine", "heatmap", "lens"]
    for _, src in figures:
        assert src.startswith("data:image/png;base64,")
        image = matplotlib.image.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert image.shape[0] > 200 and image.shape[1] > 400
    assert not re.search(r"https?://", page)  # no external resource (nor any link out)
    assert not re.search(r"<link|@import|url\(|\bsrc=\"(?!data:)", page)
    assert f'<meta name="generator" content="{GENERATOR}">' in page


def test_view_embeds_the_token_table_with_limits(report, tokens):
    _, _, page = report
    view = view_data(page)
    assert view["n_records"] == 3 and [r["id"] for r in view["records"]] == ["rec0", "rec1"]
    for rec in view["records"]:
        assert rec["positions"] == list(range(6)) and rec["n_positions"] == 9 and rec["layers"] == list(range(9))
        for li, layer in enumerate(rec["layers"]):
            for pi, position in enumerate(rec["positions"]):
                row = cell(tokens, rec["id"], layer, position)
                assert rec["tokens"][pi] == row.token
                assert rec["values"][li][pi] == pytest.approx(row.entropy, rel=1e-6)
                assert rec["topk"][li][pi] == [[t, pytest.approx(p)] for t, p in zip(row.topk_tokens, row.topk_probs)]
    assert "(first 6 of 9 positions)" in page and "2 of 3 record(s)" in page
    assert ODD not in page  # never raw HTML in the page


def test_runs_without_tokens_are_compared_and_overwrite_only_a_report(tmp_path, capsys):
    a = make_run(tmp_path / "a", synthetic_tokens(n_layers=4, seed=1))
    b = make_run(tmp_path / "b", synthetic_tokens(n_layers=6, seed=2))
    for run in (a, b):
        (run / "tokens.parquet").unlink()
    out = tmp_path / "both.html"
    out.write_text(f'<html><meta name="generator" content="{GENERATOR}"></html>')  # an older report: replaced
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}\n"
    page = out.read_text()
    assert page.count("no token × layer view: this run has no tokens.parquet") == 2
    assert re.findall(r'<figure data-kind="(\w+)"', page) == ["flow", "delta", "cosine"] * 2 + ["flow", "compare"]
    assert 'id="comparison"' in page and "tiny (a)" in page and "tiny (b)" in page
    assert not list(tmp_path.glob("*.tmp"))


def test_a_run_with_head_rows_gets_the_heads_figure(tmp_path, stories):
    """A real profile with `attn_head` rows: every figure `plot.figures` draws for it is on the page, captioned."""
    model, tokenizer = stories
    records = [{"id": "a", "text": "Once upon a time there was a cat."}]
    run = profile(model, tokenizer, records, components=("layer", "attn", "ffn", "attn_head"), keep_tokens=False,
                  out_dir=tmp_path / "run", progress=False)
    page = write_report([run.out_dir], tmp_path / "heads.html").read_text(encoding="utf-8")
    shown = re.findall(r'<figure data-kind="(\w+)"><img [^>]*><figcaption>([^<]+)</figcaption>', page)
    assert [k for k, _ in shown] == ["flow", "delta", "cosine", "heads"]
    assert "attention head" in shown[-1][1]


def test_bad_input_is_a_one_line_error_and_nothing_is_overwritten(tmp_path, tokens, capsys):
    run = make_run(tmp_path / "run", tokens)
    mine = tmp_path / "mine.html"
    mine.write_text("my notes")
    with pytest.raises(InputError, match="not a report written by internal-policy"):
        write_report([run], mine)
    assert mine.read_text() == "my notes"
    with pytest.raises(InputError, match="is a folder"):
        write_report([run], tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "r.html")
    with pytest.raises(InputError, match="no 'nll' statistic"):
        write_report([run], tmp_path / "r.html", stat="nll")
    with pytest.raises(InputError, match="--records"):
        write_report([run], tmp_path / "r.html", records=0)
    running = make_run(tmp_path / "running", tokens, status="running")
    with pytest.raises(InputError, match="still running"):
        write_report([running], tmp_path / "r.html")
    damaged = make_run(tmp_path / "damaged", tokens)
    (damaged / "tokens.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="tokens.parquet is damaged"):
        write_report([damaged], tmp_path / "r.html")
    (damaged / "run.json").write_text("{")
    assert main(["report", str(damaged), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.json is damaged" in err
    assert not (tmp_path / "r.html").exists()


def test_top_ids_without_texts_use_the_run_tokenizer_or_show_ids(tmp_path, tokens, stories):
    plain = tokens.loc[tokens["record_id"] == "rec0"].drop(columns="topk_tokens")
    path = tmp_path / "tokens.parquet"
    plain.to_parquet(path)
    shown = token_view(path, {"model": "no/such-model"}, "entropy", records=1, max_positions=2)
    row = cell(plain, "rec0", 2, 1)
    assert shown["records"][0]["topk"][2][1] == [[f"#{i}", pytest.approx(p)] for i, p in zip(row.topk_ids,
                                                                                             row.topk_probs)]
    assert "could not be loaded" in shown["note"]
    _, tokenizer = stories
    decoded = token_view(path, {"model": "stories260K (embedded)"}, "entropy", records=1, max_positions=2)
    assert decoded["note"] is None
    assert [t for t, _ in decoded["records"][0]["topk"][2][1]] == [tokenizer.decode([int(i)]) for i in row.topk_ids]


# ---------------------------------------------------------------- the page in headless Chromium


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (it reads fd 3, writes fd 4; JSON + NUL)."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", "--window-size=1400,1000")

    def __init__(self, binary: str, url: str, timeout: float = 60):
        self.profile = tempfile.TemporaryDirectory()
        child_in, self.writer = os.pipe()
        self.reader, child_out = os.pipe()

        def wire() -> None:  # in the child: the pipe ends on the fds Chromium expects
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.proc = subprocess.Popen([binary, *self.FLAGS, f"--user-data-dir={self.profile.name}", "about:blank"],
                                     pass_fds=(3, 4), preexec_fn=wire, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(child_in)
        os.close(child_out)
        self.timeout, self.buffer, self.last_id, self.events = timeout, b"", 0, []
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable", page=True)
        self.send("Page.navigate", page=True, url=url)
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._message())

    def _message(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self.buffer:
            if not select.select([self.reader], [], [], max(deadline - time.monotonic(), 0))[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self.reader, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, page: bool = False, **params) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if page:
            message["sessionId"] = self.session
        os.write(self.writer, json.dumps(message).encode() + b"\0")
        while (reply := self._message()).get("id") != self.last_id:
            self.events.append(reply)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", page=True, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def hover(self, selector: str) -> None:
        """Move the mouse (a real input event) onto the centre of the element `selector`."""
        x, y = self.js(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            e.scrollIntoView({{block: "center", inline: "center"}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        self.send("Input.dispatchMouseEvent", page=True, type="mouseMoved", x=x, y=y)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            self.proc.kill()
        self.proc.wait(30)
        os.close(self.reader)
        os.close(self.writer)
        self.profile.cleanup()


@pytest.fixture(scope="module")
def browser(report):
    binary = shutil.which("chromium")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI=1 but chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); CI runs this test")
    page = Chromium(binary, report[1].resolve().as_uri())
    yield page
    page.close()


TIP = """(() => { const t = document.querySelector("#view-1 .tip"); const q = s => t.querySelector(s).textContent;
    return {hidden: t.hidden, token: q(".tt-token"), position: q(".tt-pos"), layer: q(".tt-layer"),
            value: q(".tt-value"), top: [...t.querySelectorAll(".tt-topk li")].map(li =>
            [li.querySelector(".tt-text").textContent, li.querySelector(".tt-prob").textContent])}; })()"""


def test_browser_renders_the_page_offline(browser, report):
    assert browser.js("document.title") == "internal-policy report: tiny"
    widths = browser.js("[...document.images].map(i => i.complete && i.naturalWidth)")
    assert len(widths) == 5 and all(w > 400 for w in widths)  # every figure decoded by the browser
    assert browser.js('document.querySelectorAll("#view-1 table.grid tbody tr").length') == 9
    assert browser.js('document.querySelectorAll("#view-1 table.grid tbody td").length') == 9 * 6
    urls = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert urls and all(u.startswith(("file:", "data:")) for u in urls)
    assert not [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]


@pytest.mark.parametrize(("record", "layer", "position"), [(0, 0, 0), (0, 8, 5), (0, 3, 4), (1, 5, 2)])
def test_browser_hover_shows_token_layer_value_and_top_tokens(browser, tokens, record, layer, position):
    browser.js(f'(() => {{ const s = document.querySelector("#view-1 select.record"); s.value = "{record}";'
               f's.dispatchEvent(new Event("change")); }})()')
    browser.hover(f'#view-1 tr:nth-child({9 - layer}) td[data-p="{position}"]')  # row 1 = layer L = 8
    tip = browser.js(TIP)
    row = cell(tokens, f"rec{record}", layer, position)
    assert not tip["hidden"]
    assert (tip["token"], tip["position"], tip["layer"]) == (row.token, str(position), str(layer))
    assert float(tip["value"]) == pytest.approx(row.entropy, abs=5.1e-5)
    assert [t for t, _ in tip["top"]] == list(row.topk_tokens)
    np.testing.assert_allclose([float(p) for _, p in tip["top"]], row.topk_probs, atol=5.1e-5)
    browser.send("Input.dispatchMouseEvent", page=True, type="mouseMoved", x=1, y=1)
    assert browser.js('document.querySelector("#view-1 .tip").hidden')
