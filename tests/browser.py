"""A real browser for tests: Debian's headless chromium renders a page (an HTML file, or a web
app such as the MLflow UI) to its DOM after scripts ran, and to a PNG screenshot; small checks
say whether a screenshot, or a region of it, shows something.

    from browser import render, nonblank
    dom = render("http://127.0.0.1:5000/#/experiments/1", png=tmp_path / "page.png")
    assert "Runs" in dom and nonblank(tmp_path / "page.png", box=(0, 0, 700, 450))

No chromedriver, no Selenium: one `chromium --headless --dump-dom --screenshot` process per page.
`--virtual-time-budget` lets a single-page app fetch and render before the DOM is taken:
virtual time stands still while a request is in flight, so the budget is spent on timers, not
on a slow server (measured: the MLflow 3.17 UI renders a run table in 2-3 s of real time on 2
busy cores; a static report page in under 1 s). Where chromium is not installed, `chromium()`
skips the calling test and says how to install it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio", "--disable-dev-shm-usage")
"""Flags that work here as root, with no display, no network beyond the page's own server, and
no profile carried from one page to the next (each render gets a fresh --user-data-dir)."""


def chromium() -> str:
    """The chromium executable (/usr/bin/chromium, else `chromium` on PATH); skips the calling
    test when there is none."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("chromium not installed (apt-get install chromium)")


def url_of(target: str | Path) -> str:
    """A URL as given, or a local file as a file:// URL."""
    if isinstance(target, Path) or "://" not in str(target):
        return Path(target).resolve().as_uri()
    return str(target)


def render(target: str | Path, png: Path | None = None, *, size: tuple[int, int] = (1400, 900),
           wait_ms: int = 15_000, timeout_s: float = 90.0) -> str:
    """Load `target` (a URL, or an HTML file) in headless chromium at `size` (width, height) and
    return its DOM once scripts ran for up to `wait_ms` of virtual time; with `png`, also write
    a screenshot of the window there. Raises AssertionError (with chromium's last stderr lines)
    when chromium fails or returns no DOM."""
    exe = chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--virtual-time-budget={wait_ms}", "--dump-dom"]
        if png is not None:
            png.parent.mkdir(parents=True, exist_ok=True)
            cmd.append(f"--screenshot={png}")
        proc = subprocess.run([*cmd, url_of(target)], capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    assert proc.returncode == 0 and "<html" in proc.stdout, \
        f"chromium failed on {target} (exit {proc.returncode}): {tail}"
    if png is not None:
        assert png.exists() and png.stat().st_size > 0, f"chromium wrote no screenshot of {target}: {tail}"
    return proc.stdout


def _pixels(png: Path, box: tuple[int, int, int, int] | None) -> list:
    from PIL import Image

    with Image.open(png) as img:
        img = img.convert("RGB")
        if box is not None:
            img = img.crop(box)
        return list(img.getdata())


def colours(png: Path, box: tuple[int, int, int, int] | None = None) -> int:
    """How many distinct colours the PNG (or its `box` = (left, top, right, bottom) in pixels) holds."""
    return len(set(_pixels(png, box)))


def ink(png: Path, box: tuple[int, int, int, int] | None = None) -> float:
    """Share of pixels (in `box`, else the whole image) that differ from its most common colour,
    the background: 0.0 for a blank page, a few percent for text, more for figures."""
    pixels = _pixels(png, box)
    if not pixels:
        return 0.0
    _, background = Counter(pixels).most_common(1)[0]
    return 1.0 - background / len(pixels)


def nonblank(png: Path, box: tuple[int, int, int, int] | None = None, *, min_ink: float = 0.005,
             min_colours: int = 8) -> bool:
    """Whether the PNG (or `box` of it) shows something: at least `min_ink` of its pixels off the
    background and at least `min_colours` distinct colours (anti-aliased text alone has dozens; a
    blank or one-colour region has 1-2)."""
    return ink(png, box) >= min_ink and colours(png, box) >= min_colours
