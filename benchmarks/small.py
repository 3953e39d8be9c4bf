"""Small jobs, end to end: what a newcomer meets first.

Measured in one run, each in a fresh process (imports included, as a user pays them):
1. `ckaflow.compare()` in a plain script on two small CNNs (nn.Module) and 64 synthetic 32 px images
   (in-process: no Prefect server, Dask workers as threads);
2. `ckaflow run configs/tiny.yaml` on a fresh store (the temporary Prefect server included);
3. the same command again, nothing changed (every stage skipped, the report too);
plus the ratio of 3 to 2.

    .venv/bin/python benchmarks/small.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPARE = textwrap.dedent("""
    import sys
    import ckaflow
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.conv1, self.act1 = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
            self.conv2, self.act2 = nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 4)

        def forward(self, x):
            return self.fc(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))).flatten(1))


    result = ckaflow.compare({"a": Net(0), "b": Net(1)},
                             {"kind": "synthetic", "options": {"n": 64, "size": 32, "n_classes": 4, "seed": 0}},
                             store=sys.argv[1], sites=["conv1", "act1", "conv2", "act2"], reduction="avgpool",
                             compute={"device": "cpu"})
    print(result.report)
""")


def timed(command: list[str], cwd: Path) -> float:
    """Wall-clock seconds of `command` (it must succeed)."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temporary directory)")
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="ckaflow-small-"))
    base.mkdir(parents=True, exist_ok=True)
    script = base / "compare_script.py"
    script.write_text(COMPARE)
    ckaflow = str(Path(sys.executable).with_name("ckaflow"))
    api = timed([sys.executable, str(script), str(base / "api-store")], base)
    fresh = timed([ckaflow, "run", str(REPO / "configs" / "tiny.yaml"), "--store", str(base / "tiny")], REPO)
    again = timed([ckaflow, "run", str(REPO / "configs" / "tiny.yaml"), "--store", str(base / "tiny")], REPO)
    print("| small job | seconds |\n|---|---|")
    print(f"| compare() script, two small CNNs, 64 images (in-process) | {api:.1f} |")
    print(f"| ckaflow run configs/tiny.yaml, fresh store | {fresh:.1f} |")
    print(f"| the same again, nothing changed | {again:.1f} |")
    print(f"no-op re-run / fresh run: {again / fresh:.2f}")


if __name__ == "__main__":
    main()
