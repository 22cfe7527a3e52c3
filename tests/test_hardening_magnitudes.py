"""Finite but absurd weights (issue 21, class 1's last sentence): |w| > 65504 is refused at load time.

1e30 in a projection passes a NaN check and overflows to inf inside attention. Every
adapter format the loaders read (IP-Adapter family, FaceID, InstantID, PuLID v1 / v1.1,
FACT, PVA, the pack's native files via ``convert``), the face encoder (TransFace), cached
training features, stage tokens, and PuLID's EVA-CLIP / BiSeNet reader must refuse such a
file with an error naming the file and the tensor; 65504 itself and ordinary weights load.
"""

from __future__ import annotations

import pytest
import torch

import weight_fixtures as wf
from conftest import pack

safe_load = pack("adapters.weights.safe_load")
formats = pack("adapters.formats.weight_formats")
dtypes = pack("adapters.weights.weight_dtypes")
WeightError = pack("adapters.weights.weight_errors").WeightError

FORMATS = {
    "ip_adapter sd15": lambda: wf.ip_family_state("ip_adapter", "sd15", scale=16)[0],
    "ip_adapter_plus sdxl": lambda: wf.ip_family_state("ip_adapter_plus", "sdxl", scale=16)[0],
    "ip_adapter_full_face sd15": lambda: wf.ip_family_state("ip_adapter_full_face", "sd15", scale=16)[0],
    "faceid sd15": lambda: wf.ip_family_state("faceid", "sd15", scale=16)[0],
    "faceid_plus sd15": lambda: wf.ip_family_state("faceid_plus", "sd15", scale=16)[0],
    "instantid sdxl": lambda: wf.ip_family_state("instantid", "sdxl", scale=16)[0],
    "pulid v1.1": lambda: wf.pulid_state("v1.1", scale=16)[0],
    "pulid v1": lambda: wf.pulid_state("v1", scale=16)[0],
    "fact": lambda: wf.fact_state(scale=16)[0],
    "pva": lambda: wf.flatten_nested(wf.pva_checkpoint(scale=16)[0]),
}
BAD_VALUES = {"1e30": 1e30, "-1e30": -1e30, "65505": 65505.0, "-1e5": -1e5, "inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


def _poison(state, value, which=0):
    name = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)[which]
    t = state[name].clone()
    t.view(-1)[t.numel() // 2] = value
    state[name] = t
    return name


def _write(tmp_path, tensors, fmt, stem="adapter"):
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / f"{stem}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        path = tmp_path / f"{stem}.bin"
        torch.save(tensors, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


CASES = [(v, "safetensors") for v in sorted(BAD_VALUES)] + [("1e30", "zip"), ("-inf", "zip"), ("65505", "legacy"), ("nan", "legacy")]


@pytest.mark.parametrize("value,fmt", CASES)
@pytest.mark.parametrize("adapter", sorted(FORMATS))
def test_adapter_with_huge_or_nonfinite_weight_is_refused_naming_file_and_tensor(tmp_path, adapter, value, fmt):
    state = FORMATS[adapter]()
    name = _poison(state, BAD_VALUES[value], which=len(state) // 3)
    path = _write(tmp_path, state, fmt, stem=f"poisoned_{fmt}")
    loaded = safe_load.read_weight_file(str(path))
    with pytest.raises(WeightError) as info:
        formats.convert(loaded.tensors, loaded.metadata, source=path.name)
    text = str(info.value)
    assert path.name in text and name in text, text
    assert ("65504" in text) if value not in ("inf", "-inf", "nan") else ("NaN or infinite" in text), text


@pytest.mark.parametrize("adapter", sorted(FORMATS))
def test_largest_float16_value_and_plain_weights_still_load(adapter):
    state = FORMATS[adapter]()
    _poison(state, 65504.0)
    _poison(state, -65504.0, which=1)
    assert formats.convert(state) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("value", [1e30, -3e38, 7e4])
def test_every_float_dtype_is_bounded(dtype, value):
    t = torch.zeros(3, 3, dtype=dtype)
    t[1, 1] = value
    with pytest.raises(WeightError, match="weight_x"):
        dtypes.usable_weights({"weight_x": t}, what="'f.safetensors'")


def test_float8_values_are_bounded_after_conversion():
    t = torch.full((4,), 448.0).to(torch.float8_e4m3fn)  # within range: kept
    assert dtypes.usable_weights({"w": t})["w"].dtype == torch.float32
    big = torch.full((4,), 57344.0).to(torch.float8_e5m2)  # e5m2's max, below 65504: kept
    assert float(dtypes.usable_weights({"w": big})["w"].max()) == 57344.0


@pytest.mark.parametrize("value", [1e30, float("nan"), -1e6])
def test_face_encoder_refuses_huge_weights(tmp_path, value):
    encoder_nodes = pack("nodes.identity.face_encoder_nodes")
    errors = pack("nodes.common.errors")
    sd = wf.transface_state_dict(depth=1, heads=False)
    name = _poison(sd, value)
    path = tmp_path / "encoder.pt"
    torch.save(sd, path)
    with pytest.raises(errors.IdentityAttentionError) as info:
        encoder_nodes.load_face_encoder(str(path))
    assert "encoder.pt" in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("value", [1e30, float("-inf")])
def test_pulid_loaders_refuse_huge_weights_in_eva_clip_and_parsing_files(tmp_path, monkeypatch, value):
    import folder_paths

    pulid_nodes = pack("nodes.identity.pulid_nodes")
    errors = pack("nodes.common.errors")
    loaders = (("eva", wf.tiny_eva_state(width=32, depth=1, mlp_hidden=16, embed_dim=16), pulid_nodes.LoadEvaClip, "clip_vision"),
               ("bisenet", wf.bisenet_state(), pulid_nodes.LoadFaceParsing, "facexlib"))
    for stem, state, loader, folder in loaders:
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(tmp_path)], {".safetensors"}))
        name = _poison(state, value)
        path = _write(tmp_path, state, "safetensors", stem=stem)
        with pytest.raises(errors.IdentityAttentionError) as info:
            loader().load(f"{folder}/{path.name}")
        assert path.name in str(info.value) and name in str(info.value) and loader.DISPLAY_NAME in str(info.value)


def test_cached_training_features_are_bounded(tmp_path):
    training_data = pack("adapters.training.training_data")
    path = _write(tmp_path, {"embedding": torch.tensor([[1.0, 2e30]])}, "safetensors", stem="features")
    with pytest.raises(WeightError) as info:
        training_data.load_features(str(path))
    assert "features.safetensors" in str(info.value) and "embedding" in str(info.value)
