"""Which nodes work on which model family: DIT_NODES, the README table, and the refusals."""

from __future__ import annotations

import pytest

from conftest import REPO, pack
from testkit import tiny_flux


def readme_family_rows():
    text = (REPO / "README.md").read_text()
    section = text.split("## Model families", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("Node", "---"):
            rows[cells[0]] = cells[2]
    return rows


def test_readme_table_matches_dit_nodes():
    layout = pack("nodes.common.dit_layout")
    rows = readme_family_rows()
    assert set(rows) == set(layout.README_ROWS)
    covered = [node_id for ids in layout.README_ROWS.values() for node_id in ids]
    assert sorted(covered) == sorted(layout.DIT_NODES)
    for row, ids in layout.README_ROWS.items():
        for node_id in ids:
            status = layout.DIT_NODES[node_id][layout.FLUX]
            word = "yes" if status == layout.YES else ("UNet-only" if status.startswith(layout.UNET_ONLY) else "not yet")
            assert rows[row].startswith(word), f"README says {rows[row]!r} for {row}, DIT_NODES says {word} for {node_id}"


def test_every_listed_node_exists():
    layout = pack("nodes.common.dit_layout")
    text = "".join(p.read_text() for p in (REPO / "nodes").rglob("*.py"))
    for node_id in layout.DIT_NODES:
        assert f'NODE_ID = "{node_id}"' in text, node_id


@pytest.mark.skipif(not tiny_flux.flux_available(), reason=tiny_flux.SKIP_REASON)
def test_unet_only_nodes_refuse_flux_naming_the_node():
    guard = pack("nodes.common.input_guard")
    errors = pack("nodes.common.errors")
    layout = pack("nodes.common.dit_layout")
    flux = tiny_flux.build_flux(0)

    class FaceAdapterLike:
        NODE_ID = "IdentityAttentionApplyFaceAdapter"
        DISPLAY_NAME = "Apply face adapter"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL", {})}}

    with pytest.raises(errors.IdentityAttentionError) as info:
        guard.check_inputs(FaceAdapterLike, {"model": flux})
    message = str(info.value)
    assert "Apply face adapter" in message and "UNet-only" in message and "model" in message
    layout.check_model_family("IdentityAttentionApplyParallelAttention", flux, "Apply parallel visual attention")  # works on Flux
    layout.check_model_family("IdentityAttentionModelInfo", flux, "Model info")  # read-only nodes take any model


def test_unet_models_pass_the_family_check(tiny):
    layout = pack("nodes.common.dit_layout")
    unet = tiny.unet("sd15")
    for node_id in layout.DIT_NODES:
        layout.check_model_family(node_id, unet, node_id)
    assert layout.dit_family(unet) is None and not layout.is_unknown_dit(unet)


@pytest.mark.parametrize("module, cls, others, made_for", [  # others: the inputs between model and weight
    ("nodes.flux.flux_identity_pulid_nodes", "ApplyPuLIDFlux", 2, "PuLID-Flux is made for Flux.1's blocks"),
    ("nodes.flux.flux_ip_adapter_nodes", "ApplyFluxIPAdapter", 3, "XLabs' IP-Adapter is made for Flux.1's double blocks"),
    ("nodes.flux.instantx_flux_ip_adapter_nodes", "ApplyInstantXFluxIPAdapter", 3, "InstantX's IP-Adapter is made for Flux.1's blocks"),
])
def test_flux_only_nodes_refuse_a_unet_model_naming_node_input_and_fix(tiny, module, cls, others, made_for):
    errors = pack("nodes.common.errors")
    node = getattr(pack(module), cls)
    with pytest.raises(errors.IdentityAttentionError) as info:
        node().apply(tiny.unet("sd15"), *([None] * others), 1.0, 0.0, 1.0, "both")
    message = str(info.value)
    assert f"{made_for}; this MODEL is not a Flux.1 model" in message and node.DISPLAY_NAME in message
    assert getattr(info.value, "input_name", None) == "model" and "connect a Flux.1 model" in message


@pytest.mark.skipif(not tiny_flux.flux_available(), reason=tiny_flux.SKIP_REASON)
def test_model_report_on_flux_lists_blocks_effects_and_unet_only_nodes():
    from testkit.synthetic import synthetic_adapter, synthetic_identity

    inspect_nodes = pack("nodes.identity.inspect_nodes")
    pva = pack("nodes.pva.parallel_attention_nodes").ApplyParallelAttention()
    flux = tiny_flux.build_flux(0)
    adapter = synthetic_adapter([], "sd15", tiny_flux.CONTEXT, mechanism="joint")
    model, = pva.apply(flux, adapter, synthetic_identity(), 0.7, 0.0, 1.0, "both", "auto", "layer", "fused")
    report, = inspect_nodes.ModelAttentionInfo().report(model)
    assert f"{tiny_flux.DEPTH} double blocks, {tiny_flux.DEPTH_SINGLE} single blocks" in report
    assert "1. Apply parallel visual attention (joint, Flux.1, layer projections): weight 0.7" in report
    assert "ApplyFaceAdapter (UNet-only:" in report
    plain, = inspect_nodes.ModelAttentionInfo().report(flux)
    assert "joint-attention effects: none" in plain
