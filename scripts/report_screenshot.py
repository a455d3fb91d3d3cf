"""Screenshot of a report's embedding explorer with a tooltip showing (for docs/): headless Chromium via Selenium.

Usage: .venv/bin/python scripts/report_screenshot.py demo_out/report.html docs/explorer.png [LOCATION]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

POINT_JS = """
const doc = Bokeh.documents[0];
const fig = doc.get_model_by_name('embedding-explorer');
const srcs = [...doc.all_models].filter(m => m.name && m.name.startsWith('explorer-patches-'));
const src = srcs.find(s => s.name.endsWith(arguments[0])) || srcs[0];
function find(v) { if (v.model === fig) return v; for (const c of (v.child_views || [])) { const r = find(c); if (r) return r; } return null; }
let pv = null; for (const v of Bokeh.index.roots) pv = pv || find(v);
pv.el.scrollIntoView();
window.scrollBy(0, -60);
const r = pv.canvas_view.el.getBoundingClientRect(), i = Math.floor(src.get_length() / 2);
return [r.left + pv.frame.x_scale.compute(src.data.x[i]), r.top + pv.frame.y_scale.compute(src.data.y[i])];"""


def main() -> None:
    report, out = Path(sys.argv[1]), Path(sys.argv[2])
    location = sys.argv[3] if len(sys.argv) > 3 else ""
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,900"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        d.get(report.resolve().as_uri())
        while not d.execute_script("return !!(window.Bokeh && Bokeh.documents.length && Bokeh.index.roots.length)"):
            time.sleep(0.25)
        time.sleep(1)
        x, y = d.execute_script(POINT_JS, location)
        time.sleep(0.5)
        d.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        time.sleep(1.5)
        out.parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(out))
        print(f"wrote {out}")
    finally:
        d.quit()


if __name__ == "__main__":
    main()
