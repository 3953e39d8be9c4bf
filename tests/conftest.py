"""Shared fixtures. Nothing here assumes a running server: flow tests start their own."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One BLAS/OpenMP/torch thread per process unless a test or the pipeline's thread plan sizes the pools itself
# (flows.threads): the tests' matrices are small, and beside a Dask worker, a subprocess or any other load
# two threads per process oversubscribe a 2-core machine, where idle OpenMP/OpenBLAS threads spin: measured,
# tests/cka/test_hard.py took 179 s with 2 threads and 32 s with 1 (and a fifth of the CPU time).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server (own SQLite database) for the whole test session; its API URL.

    Command-line runs in subprocesses use it too (`tests.servers.session_prefect_env`) rather than each
    starting a temporary server of its own, which takes tens of seconds on a loaded machine."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def tiny_vit(name: str, seed: int, **overrides) -> dict:
    """A two-block ViT on 32x32 images: fast enough for end-to-end tests."""
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3, "num_classes": 0}
    return {"name": name, "arch": "vit_tiny_patch16_224", "arch_kwargs": kwargs, "weights": f"random:{seed}", **overrides}


def tiny_config(tmp_path, **overrides) -> dict:
    """A complete, small run configuration on the digits data."""
    config = {
        "name": "tiny",
        "store": str(tmp_path / "store"),
        "dataset": {"kind": "digits", "path": str(tmp_path / "digits")},
        "sampling": {"per_class": 4, "seed": 0},
        "models": [
            tiny_vit("vit_a", 0),
            tiny_vit("vit_b", 1),
            {"name": "resnet", "arch": "resnet10t", "arch_kwargs": {"num_classes": 0}, "weights": "random:2",
             "sites": "resnet-blocks", "reduction": "avgpool"},
        ],
        "sites": "vit-blocks",
        "reduction": "mean",
        "similarity": [{"kernel": "linear", "estimator": "biased"}],
        "analyses": {"probes": True, "test_fraction": 0.5},
        "compute": {"device": "cpu", "batch_size": 16, "shard_size": 16, "n_workers": 1, "memory_budget": "256MiB"},
    }
    config.update(overrides)
    return config
