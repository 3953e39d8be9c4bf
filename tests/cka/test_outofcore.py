"""Out of core: Zarr activations several times the memory budget give the in-memory matrix, and the
process's peak resident memory (VmHWM, reset just before the run) grows by less than the budget,
measured in a fresh subprocess (Linux /proc) with the malloc setting Dask gives its worker processes
(distributed.nanny.pre-spawn-environ: MALLOC_TRIM_THRESHOLD_=65536), so freed buffers count as freed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import zarr

from tasks.cka import cka_matrix

N, DIMS, BUDGET = 4096, [1024, 1024, 1024, 1024], 16 * 2**20

CHILD = textwrap.dedent("""
    import json, re, sys
    import numpy as np, zarr
    from tasks.cka import cka_matrix
    root = zarr.open_group(sys.argv[1], mode="r")
    arrays = {name: root[name] for name in sorted(root.array_keys())}
    warm = {k: np.asarray(v[:64]) for k, v in arrays.items()}
    cka_matrix(warm, method="blocked", precision="float32", block_size=32)      # imports, thread pools
    def kib(field):
        return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                                          # reset the peak (VmHWM)
    before = kib("VmRSS")
    out = cka_matrix(arrays, method="blocked", precision="float32", memory_budget=int(sys.argv[2]))
    after = kib("VmHWM")
    print(json.dumps({"cka": out.values.tolist(), "grew": after - before, "block": out.attrs["block_size"]}))
""")


def write_sites(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    latent = rng.normal(size=(N, 16)).astype(np.float32)
    root = zarr.open_group(str(path), mode="w")
    arrays = {}
    for i, d in enumerate(DIMS):
        x = latent @ rng.normal(size=(16, d)).astype(np.float32) + rng.normal(size=(N, d)).astype(np.float32)
        root.create_array(f"site{i}", shape=x.shape, chunks=(64, d), dtype="float32")[...] = x
        arrays[f"site{i}"] = x
    return arrays


def test_zarr_several_times_the_budget_matches_in_memory(tmp_path):
    arrays = write_sites(tmp_path / "acts")
    data_bytes = sum(a.nbytes for a in arrays.values())
    assert data_bytes >= 4 * BUDGET
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "acts"), str(BUDGET)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2],
                             env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"})
    try:
        in_memory = cka_matrix(arrays, method="features", precision="float64")  # meanwhile, on the other core
        stdout, stderr = child.communicate(timeout=600)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["block"] < N
    assert result["grew"] < BUDGET, f"peak memory grew by {result['grew'] / 2**20:.1f} MiB"
    np.testing.assert_allclose(np.array(result["cka"]), in_memory.values, rtol=0, atol=1e-5)
