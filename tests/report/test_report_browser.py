"""The report in a real browser: headless Chromium (Debian package `chromium`, installed here when
missing) loads index.html offline, takes a screenshot, and reports every image's naturalWidth and any
script error or console error through a probe script added to a copy of the page. A 3-model, 197-site
report (two ViT-S/16 site lists and a ResNet-18 one, from timm's real forward passes) is checked for its
legends, its tick labels and the hover read-out of its heatmaps."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
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
  const figs = Array.from(document.querySelectorAll("figure.heatmap"));
  const closed = figs.filter(f => f.closest("details") && !f.closest("details").open).map(f => f.id);
  const seen = id => { const r = document.getElementById(id).getBoundingClientRect();
                       return r.width > 0 && r.top < innerHeight && r.bottom > 0; };
  const firstScreen = {findings: seen("findings"), overview: figs.length ? seen(figs[0].id) : false, width: innerWidth,
                       height: innerHeight};
  document.querySelectorAll("details").forEach(d => { d.open = true; });  // the folded figures, drawn when opened
  out.textContent = JSON.stringify({closed: closed, firstScreen: firstScreen,
                                    images: Array.from(document.images).map(i => [i.complete, i.naturalWidth]),
                                    heatmaps: Array.from(document.querySelectorAll("figure.heatmap")).map(f => {
                                      const gid = JSON.parse(f.querySelector("script.hm-data").textContent).gid;
                                      const image = f.querySelector('[id="' + gid + '"]');
                                      return image ? image.getBoundingClientRect().width : 0; }),
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
    """Load a copy of the page with the probe script in a 1400x900 window; returns (probe record, chromium
    stderr). The record: which heatmaps are folded at load (`closed`), whether the findings and the first
    heatmap are on the first screen, each image's (complete, naturalWidth), each heatmap's width once every
    <details> is opened, and the script errors."""
    probed = html_file.with_name("probed.html")
    probed.write_text(html_file.read_text().replace("</head>", PROBE + "</head>", 1))
    done = run_chromium(["--virtual-time-budget=10000", "--window-size=1400,900", "--dump-dom", probed.as_uri()], tmp)
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
    images, heatmaps = record["images"], record["heatmaps"]
    assert len(images) + len(heatmaps) == len(list((report.parent / "figures").glob("*.png"))) > 5
    assert len(heatmaps) == len(list((report.parent / "figures").glob("cka_*.png")))  # inline SVG, drawn
    assert all(complete and width > 0 for complete, width in images), images
    assert all(width > 0 for width in heatmaps), heatmaps
    assert record["errors"] == []
    # the pair heatmaps are folded, the overviews open; the findings and the first overview on the first screen
    pairs = [p.stem for p in (report.parent / "figures").glob("cka_linear_biased_*__*.png")]
    assert sorted(record["closed"]) == sorted(f"fig-{p}" for p in pairs) and len(pairs) == 10
    seen = record["firstScreen"]  # a 1400 px wide window (headless Chromium leaves about 760 of its 900 px to the page)
    assert seen["findings"] and seen["overview"] and seen["width"] == 1400 and seen["height"] <= 900
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


# ---------------------------------------------------------------- a 3-model, 197-site report

HOVER = """<script>
window.addEventListener("load", () => {
  const out = {};
  document.querySelectorAll("details").forEach(d => { d.open = true; });  // the folded pair heatmaps
  const texts = (fig, sel) => Array.from(document.querySelectorAll("#" + fig + " " + sel)).map(t => t.textContent.trim());
  for (const fig of Array.from(document.querySelectorAll("figure.heatmap")).map(f => f.id)) {
    const node = document.getElementById(fig), data = JSON.parse(node.querySelector("script.hm-data").textContent);
    const image = node.querySelector('[id="' + data.gid + '"]');
    const hovers = [];
    for (const [i, j] of __CELLS__) {
      if (i >= data.rows.length || j >= data.cols.length) continue;
      const cell = () => { const r = image.getBoundingClientRect();
        return [r.left + (j + 0.5) / data.cols.length * r.width, r.top + (i + 0.5) / data.rows.length * r.height]; };
      const [x0, y0] = cell();
      window.scrollBy(x0 - innerWidth / 2, y0 - innerHeight / 2);  // the cell in the middle of the viewport
      const [x, y] = cell();
      document.elementFromPoint(x, y).dispatchEvent(new MouseEvent("mousemove", {clientX: x, clientY: y, bubbles: true}));
      const tip = node.querySelector(".hm-tip");
      hovers.push([i, j, tip.hidden ? null : tip.textContent]);
    }
    const axes = '[id="' + data.gid + '-axes"] ';
    out[fig] = {ticks: texts(fig, axes + '[id^="xtick_"] text').concat(texts(fig, axes + '[id^="ytick_"] text')),
                texts: texts(fig, "svg text"), hovers: hovers};
  }
  const pre = document.createElement("pre");
  pre.id = "__probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""
CELLS = [(5, 60), (60, 5), (0, 0), (40, 150), (3, 5), (5, 3)]  # resnet site 5 is layer1.0/bn2 (NaN)


def timm_sites(arch: str, preset: str) -> list[str]:
    """The site names of a timm architecture's preset, from its real (random-weights) forward pass."""
    from tasks.extract.sites import list_sites

    return [name for name, _ in list_sites(arch, {})[preset]]


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A real run store for two ViT-S/16-shaped models and a ResNet-18-shaped one (197 sites in all), with
    synthetic activations drifting with depth; the ResNet's bn2 sites are constant (timm's zero-init
    gamma), so they are degenerate."""
    from stores import write_features

    import storage
    from tasks.analyses import AnalysesOptions, run_analyses
    from tasks.cka import cka_matrix

    vit, resnet = timm_sites("vit_small_patch16_224", "vit-sublayers"), timm_sites("resnet18", "resnet-sublayers")
    rng = np.random.default_rng(0)
    n, classes = 60, 4
    labels = np.arange(n) % classes
    base = np.eye(classes)[labels] @ rng.standard_normal((classes, 12)) + rng.standard_normal((n, 12))
    root = storage.open_store(str(tmp_path_factory.mktemp("big") / "store"))
    storage.write_samples(root, xr.Dataset(
        {"image_index": ("sample", np.arange(n)), "label": ("sample", labels),
         "label_name": ("sample", np.array([f"class{c}" for c in labels], dtype=object)),
         "key": ("sample", np.array([f"img{i}.png" for i in range(n)], dtype=object)),
         "view": ("sample", np.zeros(n, dtype=int))}, attrs={"dataset": "synthetic", "seed": 0, "fingerprint": "big"}))
    models = {"vit_a": (vit, 0.3), "vit_b": (vit, 0.6), "resnet": (resnet, 0.5)}
    for name, (sites, noise) in models.items():
        g = np.random.default_rng(len(name))
        drift = np.cumsum(g.standard_normal((len(sites), 12, 12)) * 0.15, axis=0) + np.eye(12)
        features = {s: (base @ drift[k] + noise * (1 + 2 * k / len(sites)) * g.standard_normal((n, 12))).astype(np.float32)
                    for k, s in enumerate(sites)}
        features |= {s: np.ones((n, 12), np.float32) for s in sites if s.endswith("/bn2")}
        write_features(root, name, features, shard_size=32)
    arrays = {f"{m}/{s}": a for m in models for s, a in storage.activation_arrays(root, m).items()}
    assert len(arrays) == 197
    with pytest.warns(Warning):  # the degenerate bn2 sites
        storage.write_similarity(root, "linear_biased", cka_matrix(arrays))
    root.attrs["run"] = {"config": {"name": "three models"}, "started": None, "finished": None, "versions": {}}
    run_analyses(root, AnalysesOptions(probe_seed=0, test_fraction=0.25))
    return root, vit, resnet


def test_a_197_site_report_in_chromium_has_legends_real_tick_labels_and_hover_values(big_store, tmp_path):
    import storage
    from tasks.report import render_report

    root, vit, resnet = big_store
    index = Path(render_report(root))
    page = index.with_name("hover.html")
    page.write_text(index.read_text().replace("</head>", HOVER.replace("__CELLS__", json.dumps(CELLS)) + "</head>", 1))
    done = run_chromium(["--virtual-time-budget=20000", "--window-size=1400,1000", "--dump-dom", page.as_uri()], tmp_path)
    match = re.search(r'<pre id="__probe">(.*?)</pre>', done.stdout, re.DOTALL)
    assert match, done.stderr[-2000:]
    record = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&gt;", ">").replace("&lt;", "<"))
    assert console_errors(done.stderr) == []
    html = index.read_text()
    nan_table = html[html.index("NaN / non-finite sites"):html.index("Other results in this store")]
    rows = {row.split("</td>")[0]: row for row in nan_table.split("<tr><td>")[1:]}
    assert {s for s in rows} == {f"resnet/{s}" for s in resnet if s.endswith("/bn2")}  # timm's zero-init gamma
    assert all("zero_init_last" in row and "arch_kwargs {zero_init_last: false}" in row for row in rows.values())
    summary = json.loads(index.with_name("summary.json").read_text())
    ids = summary["similarity"]["linear_biased"]["sites"]
    matrix = np.array(summary["similarity"]["linear_biased"]["matrix"], dtype=float)

    overview = record["fig-cka_linear_biased_all"]
    text = " ".join(overview["texts"])
    assert "boundary between models" in text and "NaN (undefined" in text and "colour range from the data" in text
    assert "blocks.*: norm1, attn, resid1, norm2, mlp, block" in text and "layer*.*: conv1, bn1, act1, conv2, bn2, block" in text
    assert set(overview["ticks"]) <= set(ids) | {"vit_a", "vit_b", "resnet"} and len(overview["ticks"]) > 2 * 24

    real = set(vit)
    for fig in ("fig-cka_linear_biased_vit_a__vit_a", "fig-cka_linear_biased_vit_a__vit_b"):
        ticks = record[fig]["ticks"]
        assert ticks and set(ticks) <= real, sorted(set(ticks) - real)
        assert {f"blocks.{b}/norm1" for b in range(12)} <= set(ticks)  # at least one labelled tick per block
    pair = next(f for f in record if "resnet" in f and "vit_a" in f)  # models in store order, either way round
    assert "NaN (undefined" in " ".join(record[pair]["texts"])
    sites = {"vit_a": vit, "resnet": resnet}
    m_rows, m_cols = pair.removeprefix("fig-cka_linear_biased_").split("__")

    # hover: both site names and the value of the cell under the pointer, in the overview and a pair map
    shown = [f"{m}/{s}" for m, entry in summary["models"].items() for s in entry["sites"]]  # the report's model order
    for fig, rows, cols, short in (("fig-cka_linear_biased_all", shown, shown, False),
                                   (pair, [f"{m_rows}/{s}" for s in sites[m_rows]], [f"{m_cols}/{s}" for s in sites[m_cols]], True)):
        hovers = record[fig]["hovers"]
        assert len(hovers) >= 4
        for i, j, tip in hovers:
            value = matrix[ids.index(rows[i]), ids.index(cols[j])]
            name = (lambda sid: sid.split("/", 1)[1]) if short else (lambda sid: sid)
            assert tip == f"{name(rows[i])} \u00d7 {name(cols[j])}: CKA " + ("NaN" if np.isnan(value) else f"{value:.4f}")
    assert any(tip.endswith("CKA NaN") for _, _, tip in record[pair]["hovers"])
    cross = storage.read_analysis(root, "crossarch_cka")  # one point per site of model_a, for the two ViT-ResNet pairs
    counts = {str(a): len(vit if str(a).startswith("vit") else resnet) for a in cross.model_a.values}
    pairs = set(zip(cross.model_a.values.tolist(), cross.model_b.values.tolist()))
    assert len(pairs) == 2 and cross.sizes["point"] == sum(counts[a] for a, _ in pairs)
