"""The example workflows name only files weights_manifest.json knows, and carry ComfyUI's model metadata for them.

No host needed: the workflows are JSON and the metadata is a pure function of the
workflow and the manifest (scripts/workflow_models.py). What the page does with it
is read from comfyui-frontend-package 1.32.9 (see that module's docstring).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import workflow_models as wm  # noqa: E402

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
ENTRIES = wm.manifest_entries()
# Loaders whose files the pack's own nodes write (never downloaded), so no manifest entry names them.
MADE_BY_THE_PACK = {"IdentityAttentionLoadIdentityTokens"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _loader_values(node: dict):
    """Widget values that name a model file or a face pack (whatever the node type)."""
    groups = {e["group"] for e in ENTRIES if e.get("group")}
    for value in node.get("widgets_values") or []:
        if isinstance(value, str) and (value.lower().endswith(wm.WEIGHT_SUFFIXES) or value in groups):
            yield value


def _notes(workflow: dict) -> str:
    return "\n".join(str(v) for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote") for v in n.get("widgets_values", []))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_loader_value_has_a_manifest_entry_metadata_and_a_note_line(path):
    workflow = _load(path)
    notes = _notes(workflow)
    top = workflow.get("models", [])
    checked = 0
    for node in workflow["nodes"]:
        if node["type"] in MADE_BY_THE_PACK:
            continue
        on_node = node.get("properties", {}).get("models", [])
        for value in _loader_values(node):
            found = wm.entries_named_by(value, ENTRIES)
            assert found, f"{path.name}: node {node['id']} ({node['type']}) names {value!r}, which weights_manifest.json does not list"
            for item in wm.grouped(found):
                assert f"- {wm.item_id(item)}: " in notes and wm.item_url(item) in notes, f"{path.name}: the Download-first note does not say where to get {value!r}"
            for e in found:
                model = wm.page_model(e)
                if not wm.page_can_download(e):  # the page would show an error instead of a button: the note covers it
                    assert model not in on_node and model not in top
                    continue
                assert model in (on_node if value == e["file"] else top), f"{path.name}: no model metadata for {value!r} (run scripts/build_workflows.py)"
                if e["sha256"]:
                    assert model["hash"] == e["sha256"] and model["hash_type"] == "SHA256"
                checked += 1
    for node in workflow["nodes"]:  # the page counts a node's entry only while its name is one of the node's widget values
        for model in node.get("properties", {}).get("models", []):
            assert model["name"] in node["widgets_values"], (path.name, node["id"], model)
    assert checked, f"{path.name}: names no file the page can download"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_model_metadata_is_in_sync_with_the_manifest(path):
    """What the builder would write now: a changed URL or hash in the manifest means rebuilding the workflows."""
    workflow = _load(path)
    assert wm.add_model_metadata(copy.deepcopy(workflow), ENTRIES) == workflow, "run: python scripts/build_workflows.py"


def test_metadata_goes_where_the_page_reads_it():
    """Bare file names (ComfyUI's loaders) on the node; <folder>/<file> (this pack's adapter loader) in the workflow's list."""
    workflow = {"nodes": [
        {"id": 1, "type": "CLIPVisionLoader", "widgets_values": ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"], "properties": {}},
        {"id": 2, "type": "IdentityAttentionLoadIdentityAdapter", "widgets_values": ["ipadapter/ip-adapter-plus-face_sd15.safetensors", False]},
        {"id": 3, "type": "IdentityAttentionLoadIdentityAdapter", "widgets_values": ["ipadapter/ip-adapter-faceid-plusv2_sd15.bin", False]},
        {"id": 4, "type": "IdentityAttentionLoadFaceAnalysis", "widgets_values": ["antelopev2", "auto", 640]},
        {"id": 5, "type": "SomeNewLoader", "widgets_values": ["ip-adapter-faceid-plusv2_sd15_lora.safetensors"]},
        {"id": 6, "type": "Note", "widgets_values": ["ip-adapter_sd15.safetensors"]},
    ]}
    out = wm.add_model_metadata(workflow, ENTRIES)
    by_id = {e["id"]: e for e in ENTRIES}
    assert out["nodes"][0]["properties"]["models"] == [wm.page_model(by_id["clip-vit-h"])]
    assert out["models"] == [wm.page_model(by_id["ip-adapter-plus-face_sd15"])]  # .bin and .onnx: no download button in the page
    assert "models" not in out["nodes"][1]["properties"] and "models" not in out["nodes"][3]["properties"]
    assert out["nodes"][4]["properties"]["models"][0]["directory"] == "loras"  # any loader, no table of node types
    assert "properties" not in out["nodes"][5]
    assert out["models"][0]["name"] == "ip-adapter-plus-face_sd15.safetensors" and out["models"][0]["directory"] == "ipadapter"
    assert wm.add_model_metadata(copy.deepcopy(out), ENTRIES) == out  # rebuilding replaces, never duplicates


def test_page_download_rule_matches_the_frontend():
    """The frontend (1.32.9) offers downloads from huggingface.co / civitai.com for .safetensors / .sft names only."""
    frontend = next(iter(sorted(Path(sys.prefix).glob("lib/python3*/site-packages/comfyui_frontend_package/static/assets/index-*.js"))), None)
    if frontend is None:
        pytest.skip("this host's page has no missing-models dialog (the early-2024 frontend in web/ reads no model metadata)")
    text = frontend.read_text(errors="replace")
    assert "getSelectedModelsMetadata" in text and "showMissingModelsWarning" in text
    for source in wm.PAGE_SOURCES:
        assert f'"{source}"' in text, source
    for suffix in wm.PAGE_SUFFIXES:
        assert f'"{suffix}"' in text, suffix
