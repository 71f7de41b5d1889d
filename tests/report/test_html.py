"""wq_report.html in a real browser (headless Chromium, Debian's `chromium` package): the lead section and
every other section render, and no legend is cut off, on a real job's report and on one of a single block.
CI installs chromium and sets WQ_REQUIRE_TOOLS=1, so there the test cannot skip."""

import copy
import json
import os
import shutil
import subprocess

import pytest

from wq_ops.api import quantize
from wq_ops.report.html import render_html

SECTIONS = ["lead", "errors", "outliers", "time", "worst"]

# Run in the page by the browser: every legend inside its SVG's box, every section laid out with some height.
CHECK = """<script>
const cut = [];
for (const svg of document.querySelectorAll('svg')) {
  const w = svg.width.baseVal.value, h = svg.height.baseVal.value;
  for (const g of svg.querySelectorAll('g.legend')) {
    const b = g.getBBox();
    if (b.x + b.width > w + 0.5 || b.y + b.height > h + 0.5) cut.push(`${b.x + b.width}x${b.y + b.height} > ${w}x${h}`);
  }
}
const missing = %s.filter(id => {
  const e = document.getElementById(id);
  return !e || e.getBoundingClientRect().height < 10;
});
document.body.setAttribute('data-check', JSON.stringify({cut, missing, svgs: document.querySelectorAll('svg').length}));
</script>"""


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("WQ_REQUIRE_TOOLS"):
            pytest.fail("WQ_REQUIRE_TOOLS is set but no chromium is installed (apt-get install chromium)")
        pytest.skip("no headless browser here (apt-get install chromium); CI installs one and requires it")
    return found


def rendered_check(page: str, tmp_path, name: str) -> dict:
    path = tmp_path / f"{name}.html"
    path.write_text(page.replace("</body>", CHECK % json.dumps(SECTIONS) + "</body>"))
    done = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=2000", "--dump-dom", path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    marker = 'data-check="'
    start = done.stdout.index(marker) + len(marker)
    raw = done.stdout[start:done.stdout.index('"', start)]
    return json.loads(raw.replace("&quot;", '"').replace("&amp;", "&").replace("&gt;", ">").replace("&lt;", "<"))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    os.environ.setdefault("WQ_CACHE_DIR", str(tmp / "cache"))
    result = quantize(out=tmp / "o", samples=8, seq_len=128, progress=False)
    assert result.report is not None
    return result.report


def test_the_page_leads_with_what_a_user_checks_first(report):
    page = render_html(report)
    lead = page[page.index('id="lead"'):page.index('id="errors"')]
    for heading in ("vLLM tensor parallel", "size", "read by", "quality", "mean output error"):
        assert f"<th>{heading}</th>" in lead
    assert "loads at 1, 2 with the default kernels" in lead and "smaller than the source" in lead
    assert "compressed-tensors &gt;= 0.6.0" in lead and "not evaluated (run with --eval TEXT)" in lead
    assert page.index('id="lead"') < page.index('id="errors"') < page.index('id="time"')


def test_a_browser_renders_every_section_and_every_legend_whole(report, tmp_path):
    check = rendered_check(render_html(report), tmp_path, "four-blocks")
    assert check == {"cut": [], "missing": [], "svgs": 3}


def test_a_model_of_one_block_keeps_its_legends_whole(report, tmp_path):
    """The legend is taller than a heatmap of one row: the old page cut it off."""
    one = copy.deepcopy(report)
    one["layers"] = [x for x in one["layers"] if x["block"] == 0]
    one["blocks"] = one["blocks"][:1]
    check = rendered_check(render_html(one), tmp_path, "one-block")
    assert check == {"cut": [], "missing": [], "svgs": 3}
