"""The report in a real browser: headless Chromium (Debian package `chromium`, installed here when
missing) loads index.html offline, takes a screenshot, and reports every image's naturalWidth and any
script error or console error through a probe script added to a copy of the page."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.report import build_report

CHROMIUM = Path("/usr/bin/chromium")
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.src))), true);
const __consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.join(" ")); __consoleError(...args); };
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "__probe";
  out.textContent = JSON.stringify({images: Array.from(document.images).map(i => [i.complete, i.naturalWidth]),
                                    errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


def chromium() -> Path:
    """Path of Chromium, installed with apt-get when missing; skips (with the reason) when that fails."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is missing and apt-get is not available to install it")
    for command in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode == 0 and command[1] == "install":
            break
    if not CHROMIUM.exists():
        pytest.skip(f"chromium is missing and `apt-get install -y chromium` failed: {done.stderr.strip()[-400:]}")
    return CHROMIUM


def run_chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(chromium()), *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=180)


def probe(html_file: Path, tmp: Path) -> tuple[dict, str]:
    """Load a copy of the page with the probe script; returns (probe record, chromium stderr)."""
    probed = html_file.with_name("probed.html")
    probed.write_text(html_file.read_text().replace("</head>", PROBE + "</head>", 1))
    done = run_chromium(["--virtual-time-budget=10000", "--dump-dom", probed.as_uri()], tmp)
    match = re.search(r'<pre id="__probe">(.*?)</pre>', done.stdout, re.S)
    assert match, f"probe record missing from the DOM; chromium said: {done.stderr[-2000:]}"
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&")), done.stderr


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and re.search(r"Uncaught|Error|error", line)]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    from test_report import synthetic_report_data

    out = tmp_path_factory.mktemp("browser_report")
    return Path(build_report(synthetic_report_data(), str(out)))


def test_report_renders_in_chromium_with_images_and_no_errors(report, tmp_path):
    record, stderr = probe(report, tmp_path)
    images = record["images"]
    assert len(images) == len(list((report.parent / "figures").glob("*.png"))) > 5
    assert all(complete and width > 0 for complete, width in images), images
    assert record["errors"] == []
    assert console_errors(stderr) == []

    shot = tmp_path / "report.png"
    done = run_chromium([f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri()], tmp_path)
    assert shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2400, 1280) and pixels.std() > 10  # a rendered page, not a blank one


def test_the_probe_catches_a_broken_image_and_a_script_error(report, tmp_path):
    broken = report.with_name("broken.html")
    broken.write_text(report.read_text().replace(
        "</body>", '<img src="data:image/png;base64,AAAA"><script>undefinedFunction();</script></body>', 1))
    record, stderr = probe(broken, tmp_path)
    assert record["images"][-1][1] == 0
    assert any("undefinedFunction" in e for e in record["errors"])
