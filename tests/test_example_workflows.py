"""Every example workflow loads in the host without missing nodes or widget errors, and runs on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import tiny_swap, workflow
import harness.provisioning  # noqa: F401  (registers provisioners)

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))


def test_builder_round_trips_through_the_converter(server):
    """A workflow authored with the builder converts back to the API prompt it describes."""
    info = server.object_info()
    wb = workflow.WorkflowBuilder(info)
    ckpt = wb.node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    pos = wb.node("CLIPTextEncode", text="a cat", clip=ckpt[1])
    neg = wb.node("CLIPTextEncode", text="", clip=ckpt[1])
    latent = wb.node("EmptyLatentImage", width=64, height=64)
    sampler = wb.node("KSampler", model=ckpt[0], positive=pos[0], negative=neg[0], latent_image=latent[0], seed=7, steps=2)
    wb.node("SaveLatent", samples=sampler[0], filename_prefix="latents/roundtrip")
    wb.note("a note")
    ui = json.loads(json.dumps(wb.build("round trip")))
    api = workflow.ui_to_api(ui, info)
    assert api["5"]["class_type"] == "KSampler"
    assert api["5"]["inputs"]["seed"] == 7 and api["5"]["inputs"]["steps"] == 2
    assert api["5"]["inputs"]["model"] == ["1", 0] and api["5"]["inputs"]["latent_image"] == ["4", 0]
    assert api["5"]["inputs"]["cfg"] == info["KSampler"]["input"]["required"]["cfg"][1]["default"]
    assert "7" not in api  # the note is UI-only
    entry = server.run(tiny_swap.for_tiny_models(api, server.instance))
    assert len(server.output_files(entry, "latents")) == 1


def test_converter_rejects_unknown_nodes_and_wrong_widget_counts(server):
    info = server.object_info()
    wb = workflow.WorkflowBuilder(info)
    wb.node("EmptyLatentImage", width=64, height=64)
    ui = wb.build()
    ui["nodes"][0]["widgets_values"].append(3)
    with pytest.raises(workflow.WorkflowError, match="widget values"):
        workflow.ui_to_api(ui, info)
    ui["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(workflow.WorkflowError, match="not installed"):
        workflow.ui_to_api(ui, info)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_loads_and_runs_on_tiny_models(server, path):
    info = server.object_info()
    ui = workflow.load_workflow(path)
    missing = {t for t in workflow.node_types(ui) if t not in info and t not in workflow.VIRTUAL_NODES}
    assert not missing, f"{path.name} uses nodes this host does not have: {missing}"
    assert any(n["type"] in ("Note", "MarkdownNote") for n in ui["nodes"]), f"{path.name} has no note telling artists what to download"
    prompt = tiny_swap.for_tiny_models(workflow.ui_to_api(ui, info), server.instance)
    entry = server.run(prompt)
    assert server.output_files(entry, "images"), f"{path.name} saved no image"
