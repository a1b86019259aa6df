"""report.html as a person sees it: opened from file:// in headless Chromium (Debian's; the test
skips without it), every figure loaded and showing something where the page puts it.

The page has no script of its own. A copy of it gets a probe appended that writes, into the DOM,
each figure's loaded size and where it sits; the dumped DOM gives those boxes, a screenshot of
the whole page gives their pixels."""

from __future__ import annotations

import json
import re

import pytest
from browser import nonblank, render
from test_report_files import _grid

from orchestrator import report

PROBE = """<script>
window.addEventListener('load', () => {
  const figs = [...document.querySelectorAll('figure img')].map(img => {
    const r = img.getBoundingClientRect();
    return {alt: img.alt, natural: img.naturalWidth, complete: img.complete,
            box: [r.left, r.top + window.scrollY, r.right, r.bottom + window.scrollY],
            shown: getComputedStyle(img.closest('.panel') || img).display !== 'none'};
  });
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({figs, height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


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
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


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
