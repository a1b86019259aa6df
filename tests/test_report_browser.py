"""report.html as a person sees it: opened from file:// in headless Chromium (Debian's; the test
skips without it), every figure loaded and showing something where the page puts it.

The page has no script of its own. A copy of it gets a probe appended that writes, into the DOM,
each figure's loaded size and where it sits; the dumped DOM gives those boxes, a screenshot of
the whole page gives their pixels."""

from __future__ import annotations

import html
import json
import re

import pytest
from browser import nonblank, render
from test_report_files import _conditioned, _grid

from orchestrator import report

PROBE = """<script>
window.addEventListener('load', () => {
  const figs = [...document.querySelectorAll('figure img')].map(img => {
    const r = img.getBoundingClientRect();
    return {alt: img.alt, natural: img.naturalWidth, complete: img.complete,
            box: [r.left, r.top + window.scrollY, r.right, r.bottom + window.scrollY],
            shown: getComputedStyle(img.closest('.panel') || img).display !== 'none'};
  });
  const box = el => { const r = el.getBoundingClientRect();
                      return [r.left, r.top + window.scrollY, r.right, r.bottom + window.scrollY]; };
  const block = document.querySelector('#conditions');
  const conditions = block && {box: box(block), text: block.innerText,
    rows: [...block.querySelectorAll('tbody tr')].map(tr => ({
      defence: tr.querySelector('th').innerText,
      badges: [...tr.querySelectorAll('.badge')].map(b => ({
        text: b.innerText, background: getComputedStyle(b).backgroundColor, box: box(b)}))}))};
  const cards = [...document.querySelectorAll('.card .cond')].map(e => e.innerText);
  const summary = document.querySelector('#summary');
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({figs, conditions, cards, summary: summary && box(summary),
                                    height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    """A report that judged three defences on the four conditions (hand-made records: no store)."""
    out = tmp_path_factory.mktemp("conditioned")
    rows, rec = _conditioned()
    report.write(rows, "conditioned", out, conditions=rec)
    return out / "report.html"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    store = f"sqlite:///{tmp}/mlflow.db"
    _grid(store, "browser")
    out = tmp / "report"
    report.write(report.load(store, "browser"), "browser", out)
    return out / "report.html"


def _probe(page, size):
    probed = page.with_name("probed.html")
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = render(probed, size=size, wait_ms=3000)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe did not run: the page failed to load"
    return json.loads(html.unescape(found.group(1)))


def test_every_figure_loads_and_shows_something_where_the_page_puts_it(page, tmp_path):
    width = 1300
    first = _probe(page, (width, 900))
    probe = _probe(page, (width, first["height"]))   # a window the whole page fits in
    figs = probe["figs"]
    titles = " ".join(f["alt"] for f in figs)
    for wanted in ("Survival", "Harmfulness", "Worst case", "convergence"):
        assert wanted in titles, f"no figure titled {wanted!r} on the page"
    assert all(f["complete"] and f["natural"] > 300 for f in figs), figs   # every data: image decoded
    shown = [f for f in figs if f["shown"]]
    # the survival curves in other units wait behind their tabs: one survival figure is shown
    assert sum("Survival" in f["alt"] for f in shown) == 1 and len(shown) == 4

    shot = tmp_path / "page.png"
    render(page, shot, size=(width, probe["height"]), wait_ms=3000)
    for f in shown:
        left, top, right, bottom = (round(v) for v in f["box"])
        assert right - left > 300 and bottom - top > 200, f
        assert nonblank(shot, (left, top, right, bottom), min_ink=0.02), f"{f['alt']} is blank on the page"
    # and the headline: the page starts with each defence's worst case
    assert nonblank(shot, (0, 0, width, 250))


def test_a_unit_tab_shows_its_own_survival_figure(page, tmp_path):
    # the tabs are radio buttons and CSS: checking 'tokens' in the markup shows the tokens figure alone
    html = page.read_text()
    assert "id='survival-tokens-tab'" in html
    flipped = page.with_name("flipped.html")
    flipped.write_text(html.replace("id='survival-steps-tab' checked", "id='survival-steps-tab'")
                       .replace("id='survival-tokens-tab'", "id='survival-tokens-tab' checked"))
    shown = [f["alt"] for f in _probe(flipped, (1300, 900))["figs"] if f["shown"] and "Survival" in f["alt"]]
    assert shown == ["Survival against budget (tokens)"]


BADGES = {"base (reference)": ["✗ fail", "● reference", "● reference", "● reference"],
          "wall": ["✗ fail", "✓ pass", "✗ fail", "✗ fail"],
          "shield": ["✓ pass", "✗ fail", "? inconclusive", "– not measured"]}
"""Per defence, its four conditions' badges (resistance, stability, trainability, generalisation)."""


def test_the_conditions_show_near_the_top_as_badges_with_the_benign_fine_tune_below(conditioned, tmp_path):
    width = 1300
    first = _probe(conditioned, (width, 900))
    probe = _probe(conditioned, (width, first["height"]))
    block = probe["conditions"]
    assert block, "no conditions block on the page"
    left, top, right, bottom = (round(v) for v in block["box"])
    # near the top: above the summary table and every figure but its own
    assert top < probe["summary"][1] and top < 900, (block["box"], probe["summary"])
    others = [f for f in probe["figs"] if f["shown"] and "Trainability" not in f["alt"]]
    assert others and all(top < f["box"][1] for f in others)
    # a row per defence, its badges in words (a symbol and the verdict: it reads without colour)
    assert {r["defence"]: [b["text"].strip() for b in r["badges"]] for r in block["rows"]} == BADGES
    colour = {b["text"].split()[-1]: b["background"] for r in block["rows"] for b in r["badges"]}
    assert len({colour["pass"], colour["fail"], colour["inconclusive"], colour["reference"]}) == 4, colour
    assert all(b["box"][2] - b["box"][0] > 20 for r in block["rows"] for b in r["badges"])   # laid out, visible
    for figure in ("worst 8 steps", "Δ -0.020", "3x", "> 1.5x", "0.4x", "> 2.95x [1.6, 4]"):
        assert figure in block["text"], figure
    assert probe["cards"] == ["the reference the conditions compare with", "1 of 4 conditions passed",
                              "1 of 2 conditions passed; 1 inconclusive, 1 not measured"]

    (chart,) = [f for f in probe["figs"] if "Trainability" in f["alt"]]
    assert chart["shown"] and chart["complete"] and chart["natural"] > 300
    c_left, c_top, c_right, c_bottom = (round(v) for v in chart["box"])
    assert top < c_top and c_bottom <= bottom, "the benign fine-tune's figure sits outside the conditions block"
    shot = tmp_path / "conditions.png"
    render(conditioned, shot, size=(width, probe["height"]), wait_ms=3000)
    assert nonblank(shot, (c_left, c_top, c_right, c_bottom), min_ink=0.02), "the trainability figure is blank"
    table_bottom = max(b["box"][3] for r in block["rows"] for b in r["badges"])
    assert nonblank(shot, (left, top, right, round(table_bottom)), min_ink=0.02, min_colours=30)


def test_a_report_without_conditions_has_no_conditions_block(page):
    text = page.read_text()
    assert "id='conditions'" not in text and "Trainability" not in text and "conditions passed" not in text
