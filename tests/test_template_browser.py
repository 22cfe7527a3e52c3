"""ComfyUI's template browser shows every example workflow with its thumbnail, in order, described.

The page (comfyui-frontend-package 1.32.9) lists ``example_workflows/<name>.json`` of a pack with
the thumbnail ``<name>.jpg`` (square cards) and only the file name as title and description;
scripts/workflow_thumbnails.py draws each workflow's rank (1 = start here) and one-line
description into its thumbnail and records both in the JPEG comment.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import workflow_catalog  # noqa: E402
import workflow_thumbnails  # noqa: E402

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
NAMES = [p.stem for p in WORKFLOWS]


def test_every_workflow_has_a_place_in_the_order_and_start_here_is_first():
    missing = [n for n in NAMES if n not in workflow_catalog.ORDER]
    assert not missing, f"give {missing} a place in scripts/workflow_catalog.py ORDER (simplest first), then run scripts/workflow_thumbnails.py"
    assert [n for n in workflow_catalog.ORDER if n not in NAMES] == [], "ORDER names workflows that do not exist"
    assert len(set(workflow_catalog.ORDER)) == len(workflow_catalog.ORDER)
    assert workflow_catalog.ORDER[0] == workflow_catalog.START_HERE and workflow_catalog.rank(workflow_catalog.START_HERE) == 1


@pytest.mark.parametrize("name", NAMES)
def test_every_workflow_has_a_one_line_description(name):
    text = workflow_thumbnails.description(name)
    assert text.strip() and "\n" not in text and len(text) <= 160, f"{name}: the spec's returned description must be one line"


@pytest.mark.parametrize("name", NAMES)
def test_every_workflow_has_its_thumbnail(name):
    from PIL import Image

    path = REPO / "example_workflows" / f"{name}.jpg"
    assert path.is_file(), f"{name}.jpg is missing: run python scripts/workflow_thumbnails.py"
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.width == image.height == workflow_thumbnails.SIZE  # the page's cards are square
    assert path.stat().st_size < 100_000
    assert workflow_thumbnails.recorded_comment(path) == workflow_thumbnails.comment(name), \
        f"{name}.jpg shows another rank or description: run python scripts/workflow_thumbnails.py"


def test_no_thumbnail_without_a_workflow():
    assert sorted(p.stem for p in (REPO / "example_workflows").glob("*.jpg")) == NAMES


@pytest.mark.host
def test_the_host_serves_templates_and_thumbnails(server):
    """ComfyUI 0.3.x lists the pack's workflows and serves each thumbnail where the page asks for it."""
    try:
        listing = server.get("/workflow_templates")
    except urllib.error.HTTPError as err:
        if err.code == 404:
            pytest.skip("this host has no template browser (early-2024 ComfyUI)")
        raise
    module = next((m for m, names in listing.items() if set(NAMES) <= set(names)), None)
    assert module, f"the pack's workflows are not listed: {listing}"
    for name in (NAMES[0], workflow_catalog.START_HERE):
        with urllib.request.urlopen(f"{server.base}/api/workflow_templates/{module}/{name}.jpg", timeout=30) as r:
            assert r.headers.get("Content-Type", "").startswith("image/jpeg") and r.read(3) == b"\xff\xd8\xff"
        with urllib.request.urlopen(f"{server.base}/api/workflow_templates/{module}/{name}.json", timeout=30) as r:
            assert json.loads(r.read())["nodes"]
