"""The interactive report: explorer, maps and charts, written offline; opened in a real (headless) Chromium."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from geomoe.cli import app
from geomoe.embedding.extract import Embeddings

runner = CliRunner()


@pytest.fixture(scope="module")
def predicted(bundle_dir, synth_root, tmp_path_factory) -> Path:
    """Predictions of two synthetic scenes by the test bundle."""
    out = tmp_path_factory.mktemp("pred")
    scenes = sorted(synth_root.glob("*/images/*.tif"))[:2]
    r = runner.invoke(app, ["predict", *map(str, scenes), "-b", str(bundle_dir), "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def report(bundle_dir, predicted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    r = runner.invoke(app, ["report", "-p", str(predicted), "-o", str(out)])  # the bundle comes from the summaries
    assert r.exit_code == 0, r.output
    return out


def test_report_is_self_contained_and_holds_every_patch(report, bundle_dir):
    page = report.read_text()
    assert not re.search(r"<script[^>]+src=", page), "BokehJS must be inside the page (no CDN, works offline)"
    assert "Bokeh" in page and "embedding-explorer" in page
    n = len(Embeddings.load(bundle_dir / "embedding" / "embeddings.npz"))
    assert f"{n} patches shown" in page
    assert "Maps of predicted scenes" in page and "map-" in page


def test_explorer_over_the_limit_states_its_subset(bundle_dir, tmp_path):
    n = len(Embeddings.load(bundle_dir / "embedding" / "embeddings.npz"))
    out = tmp_path / "r.html"
    r = runner.invoke(app, ["report", "-b", str(bundle_dir), "-o", str(out), "--limit", "10"])
    assert r.exit_code == 0, r.output
    assert f"a random 10 of {n}" in out.read_text()


def test_report_says_what_is_missing(bundle_dir, predicted, tmp_path):
    no_emb = tmp_path / "bundle"
    shutil.copytree(bundle_dir, no_emb)
    (no_emb / "embedding" / "embeddings.npz").unlink()
    r = runner.invoke(app, ["report", "-b", str(no_emb), "-o", str(tmp_path / "a.html")])
    assert r.exit_code == 1 and "no patch embeddings" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "a.html").exists()

    moved = tmp_path / "pred"
    shutil.copytree(predicted, moved)
    for s in moved.glob("*_summary.json"):  # predictions whose bundle is gone
        s.write_text(s.read_text().replace(str(bundle_dir.resolve()), str(tmp_path / "gone")))
    r = runner.invoke(app, ["report", "-p", str(moved), "-o", str(tmp_path / "b.html")])
    assert r.exit_code == 1 and "needs the bundle" in r.output and "gone" in r.output

    r = runner.invoke(app, ["report", "-b", str(bundle_dir), "-p", str(tmp_path), "-o", str(tmp_path / "c.html")])
    assert r.exit_code == 1 and "no finished predictions" in r.output


def _chrome():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no Chromium here: install the distribution's chromium and chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)  # a given driver: Selenium downloads nothing


# the tooltips Bokeh shows, inside its shadow DOM
TOOLTIPS_JS = """
function walk(n, out) { if (n.shadowRoot) walk(n.shadowRoot, out);
  for (const c of n.children || []) {
    if ((c.className || '').toString().toLowerCase().includes('tooltip') && c.innerText) out.push(c.innerText);
    walk(c, out); }
  return out; }
return walk(document.body, []);"""

# the screen position of point i of a source in the explorer (the page is scrolled to it first)
POINT_JS = """
const doc = Bokeh.documents[0];
const fig = doc.get_model_by_name('embedding-explorer'), src = doc.get_model_by_name(arguments[0]);
function find(v) { if (v.model === fig) return v; for (const c of (v.child_views || [])) { const r = find(c); if (r) return r; } return null; }
let pv = null; for (const v of Bokeh.index.roots) pv = pv || find(v);
pv.el.scrollIntoView();
const r = pv.canvas_view.el.getBoundingClientRect(), i = arguments[1];
return [r.left + pv.frame.x_scale.compute(src.data.x[i]), r.top + pv.frame.y_scale.compute(src.data.y[i]),
        src.data.location[i]];"""


def test_report_in_a_real_browser(report, bundle_dir, tmp_path):
    """Chromium runs the page's scripts: one explorer point per embedded patch; hovering a point names its place."""
    driver = _chrome()
    try:
        driver.get(report.resolve().as_uri())
        deadline = time.time() + 60
        while not driver.execute_script("return !!(window.Bokeh && Bokeh.documents.length && Bokeh.index.roots.length)"):
            assert time.time() < deadline, "the report's scripts did not render"
            time.sleep(0.25)
        counts = driver.execute_script(
            "return [...Bokeh.documents[0].all_models].filter(m => m.name && m.name.startsWith('explorer-patches-'))"
            ".map(s => [s.name, s.get_length()]);")
        emb = Embeddings.load(bundle_dir / "embedding" / "embeddings.npz")
        assert sum(n for _, n in counts) == len(emb)
        assert {name.removeprefix("explorer-patches-") for name, _ in counts} == set(emb.location.tolist())
        name = counts[-1][0]
        x, y, location = driver.execute_script(POINT_JS, name, 0)
        time.sleep(0.3)
        driver.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        deadline = time.time() + 10
        while not (tips := driver.execute_script(TOOLTIPS_JS)) and time.time() < deadline:
            time.sleep(0.2)
        assert any(location in t and "region" in t for t in tips), tips
        shot = tmp_path / "explorer.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
