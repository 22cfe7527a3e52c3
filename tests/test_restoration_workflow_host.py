"""The Dual-Pivot restore wiring (scripts/workflow_specs_restore.py) runs through /prompt on the tiny models.

Built from its spec with this host's node definitions (not from the committed JSON, which the lead
regenerates), provisioned like every example workflow, and run: the restored image is saved, the
guide ControlNet and the prior are on the path, and Degrade photos reports its damage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness import provisioning  # noqa: F401  (registers the provisioners)
from harness import tiny_swap, workflow
from harness.workflow import WorkflowBuilder

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.host
def test_restore_old_photo_of_person_runs_on_tiny_models(server):
    sys.path.insert(0, str(REPO / "scripts"))
    import workflow_specs_restore as spec

    info = server.object_info()
    builder = WorkflowBuilder(info)
    description = spec.restore_old_photo_of_person(builder)
    ui = builder.build(description)
    types = workflow.node_types(ui)
    assert {"ControlNetLoader", "ControlNetApplyAdvanced", "VAEEncode", "IdentityAttentionDegradePhotos", "IdentityAttentionIdentitySimilarity"} <= set(types)
    prompt = tiny_swap.for_tiny_models(workflow.ui_to_api(ui, info), server.instance)
    sampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")
    assert 0 < sampler["inputs"]["denoise"] < 1  # img2img from the damaged photo
    entry = server.run(prompt)
    saved = server.output_files(entry, "images")
    assert any("restored" in str(p) for p in saved), saved
    texts = [t for node_id, node in prompt.items() if node["class_type"] == "IdentityAttentionShowText" for t in entry["outputs"][node_id]["text"]]
    assert texts and all("image 0:" in t for t in texts)
