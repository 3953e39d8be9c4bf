"""`ckaflow.compare` as a plain script uses it: in-process, no Prefect server, no worker process, and a config
typo refused before any work (nothing written)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import ckaflow
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.act1, self.conv2 = nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3)

    def forward(self, x):
        return self.conv2(self.act1(self.conv1(x)))


result = ckaflow.compare({"a": Net(0), "b": Net(1)}, {"kind": "synthetic", "options": {"n": 24, "size": 16}},
                         store=sys.argv[1], sites=["conv1", "act1", "conv2"], reduction="avgpool",
                         analyses={"probes": False}, compute={"device": "cpu", "shard_size": 8})
print("matrix", *result.similarity["linear_biased"].shape, "prefect" in sys.modules)
"""

TYPO = """
import sys, time
import ckaflow
from flows.config import ConfigError
start = time.perf_counter()
try:
    ckaflow.compare({"a": {"arch": "resnet18", "weights": "random:0"}}, {"kind": "synthetic"},
                    store=sys.argv[1], sampling={"per_clas": 3})
except ConfigError as error:
    print("refused", round(time.perf_counter() - start, 3), "prefect" in sys.modules, str(error).splitlines()[-1])
"""


def run_script(tmp_path: Path, text: str) -> tuple[str, dict[int, str]]:
    """Run `text` as `python script.py STORE` from a fresh directory; (stdout, pid -> command line of every
    child process seen while it ran)."""
    script = tmp_path / "script.py"
    script.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "store")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: dict[int, str] = {}
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for child in parent.children(recursive=True):
                children.setdefault(child.pid, " ".join(child.cmdline()))
        except psutil.Error:  # the script (or a child) ended meanwhile
            pass
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return out, children


@pytest.mark.timeout(600)
def test_a_script_without_a_main_guard_returns_the_result_and_leaves_no_process(tmp_path):
    out, children = run_script(tmp_path, SCRIPT)
    assert "matrix 6 6 False" in out  # 2 models x 3 sites, and Prefect was never imported
    # no Dask worker process (multiprocessing children re-run an unguarded script); only the report's figure
    # drawers (`python -m tasks.report.drawing`), and none left once the script returned
    assert all(cmd.endswith("-m tasks.report.drawing") for cmd in children.values()), children
    assert not [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert (tmp_path / "store" / "report" / "index.html").is_file()


@pytest.mark.timeout(300)
def test_a_config_typo_is_refused_before_any_work(tmp_path):
    out, _ = run_script(tmp_path, TYPO)
    refused, _seconds, prefect, message = out.split(maxsplit=3)
    assert refused == "refused" and prefect == "False"  # no Prefect, so no server
    assert "sampling.per_clas: unknown key" in message
    assert not (tmp_path / "store").exists()


@pytest.mark.timeout(600)
def test_compare_skips_analyses_and_the_report_and_takes_preprocessing(tmp_path):
    import ckaflow
    import storage
    from tests.flows.test_api import KWARGS

    images = {"kind": "synthetic", "options": {"n": 16, "size": 32, "n_classes": 2, "seed": 0}}
    result = ckaflow.compare({"a": {"arch": "vit_tiny_patch16_224", "arch_kwargs": KWARGS, "weights": "random:0"}},
                             images, store=str(tmp_path / "store"), sites="vit-blocks", report=False,
                             preprocessing={"a": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}},
                             analyses={"skip": ["probes", "target_alignment", "sublayer_attribution"]},
                             compute={"device": "cpu", "shard_size": 8})
    assert result.report == "" and not (tmp_path / "store" / "report").exists()
    assert "target_alignment" not in result.analyses and "probes" not in result.analyses
    assert "agreement" not in result.analyses and "matched_cka" in result.analyses
    attrs = storage.model_attrs(storage.open_store(result.store, mode="r"), "a")
    assert list(attrs["preprocessing"]["mean"]) == [0.5, 0.5, 0.5]
