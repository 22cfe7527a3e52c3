"""Every example workflow loads in the host without missing nodes or widget errors, and runs on tiny models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness import tiny_swap, workflow
from harness import provisioning  # registers the provisioners
from harness.provisioning_flux import host_skip_reason

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))


# loader node -> (the widget naming a weight file, how to find it in weights_manifest.json)
WEIGHT_WIDGETS = {
    "IdentityAttentionLoadFaceAnalysis": ("pack", lambda e, v: e.get("group") == v and e["folder"] == "insightface"),
    "IdentityAttentionLoadIdentityAdapter": ("adapter", lambda e, v: f"{e['folder']}/{e['file']}" == v),
    "CLIPVisionLoader": ("clip_name", lambda e, v: e["folder"] == "clip_vision" and e["file"] == v),
    "LoraLoaderModelOnly": ("lora_name", lambda e, v: e["folder"] == "loras" and e["file"] == v),
    "LoraLoader": ("lora_name", lambda e, v: e["folder"] == "loras" and e["file"] == v),
    "IdentityAttentionLoadFaceEncoder": ("encoder_name", lambda e, v: e["folder"] == "identity_attention" and e["file"] == v),
    "IdentityAttentionLoadEvaClip": ("eva_clip_name", lambda e, v: f"{e['folder']}/{e['file']}" == v),
    "IdentityAttentionLoadFaceParsing": ("parsing_name", lambda e, v: f"{e['folder']}/{e['file']}" == v),
    "ControlNetLoader": ("control_net_name", lambda e, v: e["folder"] == "controlnet" and e["file"] == v),
    "UNETLoader": ("unet_name", lambda e, v: e["folder"] == "diffusion_models" and e["file"] == v),
    "DualCLIPLoader": ("clip_name1", lambda e, v: e["folder"] == "text_encoders" and e["file"] == v),
    "VAELoader": ("vae_name", lambda e, v: e["folder"] == "vae" and e["file"] == v),
    "IdentityAttentionLoadPuLIDFlux": ("pulid_file", lambda e, v: e["folder"] == "pulid" and e["file"] == v),
    "IdentityAttentionLoadFluxIPAdapter": ("adapter_file", lambda e, v: e["folder"] == "ipadapter" and e["file"] == v),
    "IdentityAttentionLoadInstantXFluxIPAdapter": ("adapter_file", lambda e, v: e["folder"] == "ipadapter" and e["file"] == v),
}
DOWNLOAD_LINE = re.compile(r"weights download ([^\n]+)")


def _skip_where_the_host_cannot(ui: dict) -> None:
    reason = host_skip_reason(ui)  # a Flux workflow on the early-2024 host
    if reason:
        pytest.skip(reason)


def _widget(ui_node: dict, info: dict, name: str):
    names = workflow.widget_names(info)
    values, position = ui_node["widgets_values"], 0
    for widget in names:
        if widget == name:
            return values[position]
        spec = dict(workflow._inputs_in_order(info))[widget]
        position += 1 + workflow.ui_only_values(widget, spec)
    raise KeyError(name)


@pytest.mark.host
@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_names_real_files_and_says_where_to_get_them(server, path):
    """Loaders name files of weights_manifest.json, and a note gives the download command for all of them."""
    info = server.object_info()
    ui = workflow.load_workflow(path)
    _skip_where_the_host_cannot(ui)
    entries = provisioning.manifest_entries()
    ids = {e["id"] for e in entries} | {e["group"] for e in entries if e.get("group")}
    notes = " ".join(str(v) for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote") for v in n.get("widgets_values", []))
    asked = {word for line in DOWNLOAD_LINE.findall(notes) for word in line.split()}
    assert asked, f"{path.name}: no note gives the weights download command"
    assert asked <= ids, f"{path.name}: the download note names ids the manifest does not have: {sorted(asked - ids)}"
    for node in ui["nodes"]:
        if node["type"] not in WEIGHT_WIDGETS:
            continue
        widget, matches = WEIGHT_WIDGETS[node["type"]]
        value = _widget(node, info[node["type"]], widget)
        found = [e for e in entries if matches(e, value)]
        assert found, f"{path.name}: node {node['id']} ({node['type']}) names {value!r}, which weights_manifest.json does not list"
        assert any(e["id"] in asked or e.get("group") in asked for e in found), f"{path.name}: the download note does not mention {value!r}"
    assert all(n.get("title") for n in ui["nodes"] if n["type"] not in ("Note", "MarkdownNote", "Reroute")), f"{path.name}: give every node a title"
    assert ui.get("groups"), f"{path.name}: group the nodes so the graph explains itself"


@pytest.mark.host
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


@pytest.mark.host
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


@pytest.mark.host
@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_loads_and_runs_on_tiny_models(server, path):
    info = server.object_info()
    ui = workflow.load_workflow(path)
    _skip_where_the_host_cannot(ui)
    missing = {t for t in workflow.node_types(ui) if t not in info and t not in workflow.VIRTUAL_NODES}
    assert not missing, f"{path.name} uses nodes this host does not have: {missing}"
    assert any(n["type"] in ("Note", "MarkdownNote") for n in ui["nodes"]), f"{path.name} has no note telling artists what to download"
    prompt = tiny_swap.for_tiny_models(workflow.ui_to_api(ui, info), server.instance)
    entry = server.run(prompt)
    assert server.output_files(entry, "images"), f"{path.name} saved no image"
    for node_id, node in prompt.items():  # Show text nodes got their text
        if node["class_type"] == "IdentityAttentionShowText":
            texts = entry["outputs"][node_id]["text"]
            assert texts and all(t.strip() for t in texts), f"{path.name}: Show text node {node_id} showed nothing"
