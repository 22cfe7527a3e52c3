"""Format detection and conversion of every supported checkpoint layout, on synthetic
state dicts with the released key names and shapes (``weight_fixtures``), and the
checks against the MODEL an adapter will patch (tiny real-architecture UNets)."""

from __future__ import annotations

import pytest
import torch

import weight_fixtures as wf
from conftest import pack

formats = pack("adapters.formats.weight_formats")
tables = pack("adapters.weights.layer_tables")
safe_load = pack("adapters.weights.safe_load")
errors = pack("adapters.weights.weight_errors")
host = pack("nodes.common.host")

SD15_INDEX = {
    1: ("input", 1, 0), 3: ("input", 2, 0), 5: ("input", 4, 0), 7: ("input", 5, 0), 9: ("input", 7, 0), 11: ("input", 8, 0),
    13: ("output", 3, 0), 15: ("output", 4, 0), 17: ("output", 5, 0), 19: ("output", 6, 0), 21: ("output", 7, 0),
    23: ("output", 8, 0), 25: ("output", 9, 0), 27: ("output", 10, 0), 29: ("output", 11, 0), 31: ("middle", 0, 0),
}
SDXL_SAMPLES = {
    1: ("input", 4, 0), 3: ("input", 4, 1), 5: ("input", 5, 0), 7: ("input", 5, 1), 9: ("input", 7, 0), 27: ("input", 7, 9),
    29: ("input", 8, 0), 47: ("input", 8, 9), 49: ("output", 0, 0), 67: ("output", 0, 9), 69: ("output", 1, 0), 107: ("output", 2, 9),
    109: ("output", 3, 0), 111: ("output", 3, 1), 119: ("output", 5, 1), 121: ("middle", 0, 0), 139: ("middle", 0, 9),
}


def test_processor_index_tables_match_published_mapping():
    """The IP-Adapter index -> ComfyUI block table (mechanisms.md 8.1, IPAdapter_plus), middle block as ComfyUI names it."""
    assert tables.processor_table("sd15") == SD15_INDEX
    sdxl = tables.processor_table("sdxl")
    assert len(sdxl) == 70 and sorted(sdxl) == list(range(1, 140, 2))
    assert {i: sdxl[i] for i in SDXL_SAMPLES} == SDXL_SAMPLES


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_layer_tables_equal_the_hosts_layers(tiny, arch):
    """Every key the tables produce exists in ComfyUI's UNet (middle = ("middle", 0, i)), with the expected channels."""
    layers = {info.key: info for info in host.cross_attention_layers(tiny.unet(arch))}
    assert set(tables.DIFFUSERS_ORDER[arch]) == set(layers)
    assert len(layers) == (16 if arch == "sd15" else 70)
    assert all(key[1] == 0 for key in layers if key[0] == "middle")
    for path, hidden, key in wf.diffusers_attention_blocks(arch):
        assert tables.parse_diffusers_attn2(f"{path}.attn2.x")[0] == key
        assert layers[key].inner_dim == hidden // 10  # tiny models: a tenth of the real channels


def _layers_of(tiny, arch):
    return host.cross_attention_layers(tiny.unet(arch))


IP_CASES = [
    ("ip_adapter", "sd15", "ImageProjection", "clip_embeds", (4, 768)),
    ("ip_adapter", "sdxl", "ImageProjection", "clip_embeds", (4, 2048)),
    ("ip_adapter_plus", "sd15", "PerceiverResampler", "clip_hidden", (16, 768)),
    ("ip_adapter_plus", "sdxl", "PerceiverResampler", "clip_hidden", (16, 2048)),
    ("ip_adapter_full_face", "sd15", "FullFaceProjection", "clip_hidden", (257, 768)),
    ("faceid", "sd15", "FaceIDProjection", "arcface_normed", (4, 768)),
    ("faceid", "sdxl", "FaceIDProjection", "arcface_normed", (4, 2048)),
    ("faceid_plus", "sd15", "FaceIDPlusProjection", "arcface_normed+clip_hidden", (4, 768)),
    ("faceid_plus", "sdxl", "FaceIDPlusProjection", "arcface_normed+clip_hidden", (4, 2048)),
    ("instantid", "sdxl", "PerceiverResampler", "arcface", (16, 2048)),
]


@pytest.mark.parametrize("fmt,base,projector,kind,tokens", IP_CASES, ids=[f"{c[0]}-{c[1]}" for c in IP_CASES])
def test_ip_adapter_family(tiny, fmt, base, projector, kind, tokens):
    state, where = wf.ip_family_state(fmt, base, seed=3, lora_rank=4 if fmt.startswith("faceid") else 0)
    assert formats.detect_format(state) == fmt
    adapter = formats.convert(state, source="synthetic")
    assert (adapter.format, adapter.base, adapter.context_dim, adapter.mechanism) == (fmt, base, wf.CONTEXT[base], "decoupled")
    assert type(adapter.projector).__name__ == projector and adapter.projector.input_kind == kind
    assert (adapter.projector.num_tokens, adapter.projector.token_dim) == tokens
    assert len(adapter.layers) == (16 if base == "sd15" else 70)
    for name, key in where.items():
        assert adapter.layers[key]["to_k"] is state[name]
        assert adapter.layers[key]["to_v"] is state[name.replace("to_k_ip", "to_v_ip")]
    if fmt.startswith("faceid"):
        lora = adapter.extras["lora"]
        assert lora["rank"] == 4 and lora["layers"] == 2 * len(where) and "LoraLoader" in lora["note"]
    else:
        assert "lora" not in adapter.extras
    formats.check_against_model(adapter, _layers_of(tiny, base))  # fits the real-architecture model


def test_ip_adapter_sd15_full_size_safetensors_and_bin_agree(tmp_path, tiny):
    """Real SD1.5 shapes (320/640/1280 channels, fp16 like the release) through both file layouts."""
    from safetensors.torch import save_file

    state, where = wf.ip_family_state("ip_adapter", "sd15", scale=1, seed=4, dtype=torch.float16)
    save_file(state, str(tmp_path / "a.safetensors"))
    torch.save(wf.nested_ip(state), str(tmp_path / "a.bin"))
    adapters = []
    for name in ("a.safetensors", "a.bin"):
        loaded = safe_load.read_weight_file(str(tmp_path / name))
        adapters.append(formats.convert(loaded.tensors, loaded.metadata))
    a, b = adapters
    assert a.layers.keys() == b.layers.keys() and len(a.layers) == 16
    for key in a.layers:
        assert torch.equal(a.layers[key]["to_k"], b.layers[key]["to_k"])
        assert a.layers[key]["to_k"].dtype == torch.float16  # file dtype kept
    assert a.layers[("middle", 0, 0)]["to_k"].shape == (1280, 768)
    assert a.layers[("input", 1, 0)]["to_k"].shape == (320, 768)
    assert next(a.projector.parameters()).dtype == torch.float16
    with pytest.raises(errors.WeightError, match="channels"):  # a real-size adapter does not fit the tiny model
        formats.check_against_model(a, _layers_of(tiny, "sd15"))


def test_faceid_plus_version_hint():
    state, _ = wf.ip_family_state("faceid_plus", "sd15", seed=5)
    v2 = formats.convert(state)
    v1 = formats.convert(state, hints={"faceid_plus_shortcut": False, "faceid_plus_reason": "size of the released v1 file"})
    assert v2.projector.shortcut is True and "PlusV2" in v2.metadata["faceid_plus_version"]
    assert v1.projector.shortcut is False and "v1" in v1.metadata["faceid_plus_version"]


@pytest.mark.parametrize("version,cls,tokens", [("v1.1", "PuLIDIDFormer", 8), ("v1", "PuLIDIDEncoder", 6)])
def test_pulid(tiny, version, cls, tokens):
    state, where = wf.pulid_state(version, seed=6)
    assert formats.detect_format(state) == "pulid"
    adapter = formats.convert(state)
    assert (adapter.base, adapter.context_dim, len(adapter.layers)) == ("sdxl", 2048, 70)
    assert type(adapter.projector).__name__ == cls and adapter.projector.num_tokens == tokens
    for name, key in where.items():
        assert adapter.layers[key]["to_k"] is state[name]
        assert adapter.layers[key]["to_v"] is state[name.replace("id_to_k", "id_to_v")]
    assert "EVA02-CLIP" in adapter.metadata["requires"]
    formats.check_against_model(adapter, _layers_of(tiny, "sdxl"))


@pytest.mark.parametrize("moved_norm", [True, False])
def test_fact(tiny, moved_norm):
    state, where = wf.fact_state(seed=7, moved_norm=moved_norm)
    assert formats.detect_format(state) == "fact"
    adapter = formats.convert(state)
    assert (adapter.format, adapter.base, adapter.context_dim, adapter.mechanism) == ("fact", "sd15", 768, "gated_self_attention")
    assert adapter.projector.input_kind == "face_tokens" and (adapter.projector.num_tokens, adapter.projector.token_dim) == (16, 768)
    expected_names = set(formats.FACT_NAMES) | (set(formats.FACT_MOVED_NORM) if moved_norm else set())
    for name, key in where.items():
        layer = adapter.layers[key]
        assert set(layer) == expected_names
        prefix = name[: -len("linear.weight")]
        for n in expected_names:
            assert layer[n] is state[prefix + n]
    assert adapter.extras["moved_block_norm"] is moved_norm
    formats.check_against_model(adapter, _layers_of(tiny, "sd15"))
    with pytest.raises(errors.WeightError, match="SD1.5.*SDXL"):
        formats.check_against_model(adapter, _layers_of(tiny, "sdxl"))


def test_fact_layer_missing_a_parameter():
    state, where = wf.fact_state(seed=8)
    name = next(iter(where)).replace("linear.weight", "alpha_dense")
    del state[name]
    with pytest.raises(errors.WeightError, match="missing alpha_dense"):
        formats.convert(state)


def test_pva_checkpoint_nested_bin(tmp_path):
    ckpt, where = wf.pva_checkpoint(seed=9)
    torch.save(ckpt, str(tmp_path / "FPIP.bin"))
    loaded = safe_load.read_weight_file(str(tmp_path / "FPIP.bin"))
    assert formats.detect_format(loaded.tensors) == "pva"
    adapter = formats.convert(loaded.tensors)
    assert (adapter.format, adapter.base, adapter.context_dim, adapter.mechanism) == ("pva", "sd2", 1024, "joint")
    assert type(adapter.projector).__name__ == "PVATransformNetwork"
    assert (adapter.projector.num_tokens, adapter.projector.token_dim) == (10, 1024)
    assert torch.equal(adapter.extras["modifier_vec"], ckpt["modifier_vec"])
    for name, key in where.items():
        layer = adapter.layers[key]
        assert set(layer) == {"to_q", "to_k", "to_v"}
        assert torch.equal(layer["to_q"], ckpt["unet"][name])
        assert torch.equal(layer["to_k"], ckpt["unet"][name.replace("visual_q", "visual_k")])
        assert layer["to_q"].shape[0] == layer["to_q"].shape[1] and layer["to_k"].shape[1] == 1024


def test_pva_finetune_without_transform_network():
    ckpt, _ = wf.pva_checkpoint(seed=10, with_transform=False)
    adapter = formats.convert(wf.flatten_nested(ckpt))
    assert adapter.projector is None and "transform_network" in adapter.metadata["note"]


# --- bad input -------------------------------------------------------------------------------------


def test_unknown_format_lists_known_formats():
    state = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4), "lora_unet_down.alpha": torch.zeros(())}
    with pytest.raises(errors.WeightError) as err:
        formats.detect_format(state)
    text = str(err.value)
    for name in formats.KNOWN_FORMATS:
        assert name in text
    assert "none of the identity-adapter formats" in text


def test_missing_layers_named():
    state, where = wf.ip_family_state("ip_adapter", "sd15", seed=11)
    for k in [k for k in state if k.startswith("ip_adapter.31.") or k.startswith("ip_adapter.5.")]:
        del state[k]
    with pytest.raises(errors.WeightError, match=r"missing 2 of the 16 SD1.5 cross-attention layers: 5 \(input block 4.*31 \(middle block 0"):
        formats.convert(state)


def test_missing_value_projection_named():
    state, _ = wf.ip_family_state("faceid", "sdxl", seed=12)
    del state["ip_adapter.139.to_v_ip.weight"]
    with pytest.raises(errors.WeightError, match=r"missing 1 of the 70 SDXL.*139 \(middle block 0, transformer 9\)"):
        formats.convert(state)


def test_layer_index_beyond_the_unet():
    state, _ = wf.ip_family_state("ip_adapter", "sd15", seed=13)
    state["ip_adapter.33.to_k_ip.weight"] = torch.zeros(32, 768)
    with pytest.raises(errors.WeightError, match=r"indices \[33\]"):
        formats.convert(state)


def test_sdxl_adapter_on_sd15_model_names_both(tiny):
    state, _ = wf.ip_family_state("ip_adapter_plus", "sdxl", seed=14)
    adapter = formats.convert(state)
    with pytest.raises(errors.WeightError) as err:
        formats.check_against_model(adapter, _layers_of(tiny, "sd15"))
    text = str(err.value)
    assert "SDXL (text context 2048)" in text and "SD1.5 (text context 768)" in text


def test_sd15_adapter_on_sdxl_model_names_both(tiny):
    state, _ = wf.ip_family_state("faceid", "sd15", seed=15)
    with pytest.raises(errors.WeightError, match=r"SD1.5 \(text context 768\).*SDXL \(text context 2048\)"):
        formats.check_against_model(formats.convert(state), _layers_of(tiny, "sdxl"))


def test_projector_width_must_match_layers():
    state, _ = wf.ip_family_state("ip_adapter", "sd15", seed=16)
    proj = wf.random_state(wf.image_proj_layout(1024, 4, 2048), seed=1)
    state.update(wf.prefixed("image_proj.", proj))
    with pytest.raises(errors.WeightError, match="width 2048 but its layers take 768"):
        formats.convert(state)
