"""The README's configuration reference is the one generated from the schema, and names every key."""

from __future__ import annotations

import re

from flows.config import RunConfig, config_reference
from tests.servers import REPO

START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def readme_reference() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index(START) + len(START):text.index(END)]


def test_readme_reference_is_current():
    assert readme_reference() == config_reference(), "regenerate it: `ckaflow config`, between the markers"


def test_reference_names_every_field_with_a_meaning():
    keys = re.findall(r"^\| `([^`]+)` \|", config_reference(), flags=re.M)
    assert {k.split(".")[0].removesuffix("[]") for k in keys} == set(RunConfig.model_fields)
    for expected in ("compute.loader_workers", "analyses.probe_seed", "similarity[].name", "similarity[].seed"):
        assert expected in keys
    assert all(row.rstrip().split("|")[-2].strip() for row in config_reference().splitlines()[2:])
