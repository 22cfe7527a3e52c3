"""The pack's native safetensors format: writer, reader, header, round trips."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import weight_fixtures as wf
from conftest import pack

native = pack("adapters.formats.native_format")
formats = pack("adapters.formats.weight_formats")
safe_load = pack("adapters.weights.safe_load")
id_adapter = pack("adapters.projectors.id_adapter")
identity_mod = pack("adapters.faces.identity")
errors = pack("adapters.weights.weight_errors")


def _read(path):
    loaded = safe_load.read_weight_file(str(path))
    assert formats.detect_format(loaded.tensors, loaded.metadata) == "native"
    return formats.convert(loaded.tensors, loaded.metadata, source=path.name)


def _same_layers(a, b):
    assert a.layers.keys() == b.layers.keys()
    for key in a.layers:
        assert a.layers[key].keys() == b.layers[key].keys()
        for name in a.layers[key]:
            x, y = a.layers[key][name], b.layers[key][name]
            assert x.dtype == y.dtype and torch.equal(x, y), (key, name)


def _features(n=2):
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(n, 512, generator=gen) * 20
    return identity_mod.IdentityFeatures(
        arcface=raw, arcface_normed=raw / raw.norm(dim=-1, keepdim=True),
        clip_embeds=torch.randn(n, 1280, generator=gen), clip_hidden=torch.randn(n, 9, 1280, generator=gen),
        face_tokens=torch.randn(n, 144, 512, generator=gen),
    )


@pytest.mark.parametrize("make", ["ip_adapter_plus-sd15", "faceid_plus-sd15", "fact", "pva", "pulid"])
def test_round_trip_of_converted_adapters(tmp_path, make):
    if make == "fact":
        state, _ = wf.fact_state(seed=1)
    elif make == "pva":
        state = wf.flatten_nested(wf.pva_checkpoint(seed=2)[0])
    elif make == "pulid":
        state, _ = wf.pulid_state("v1.1", seed=3)
    else:
        fmt, base = make.split("-")
        state, _ = wf.ip_family_state(fmt, base, seed=4, dtype=torch.float16)
    original = formats.convert(state, source="original.bin")
    path = tmp_path / "adapter.safetensors"
    native.write_native(original, str(path))
    assert not (tmp_path / "adapter.safetensors.part").exists()
    again = _read(path)

    assert again.format == "native" and again.metadata["source_format"] == original.format
    assert (again.base, again.context_dim, again.mechanism) == (original.base, original.context_dim, original.mechanism)
    _same_layers(original, again)
    assert type(again.projector) is type(original.projector) and again.projector.config == original.projector.config
    a_state, b_state = original.projector.state_dict(), again.projector.state_dict()
    assert a_state.keys() == b_state.keys() and all(torch.equal(a_state[k], b_state[k]) and a_state[k].dtype == b_state[k].dtype for k in a_state)
    if make != "pulid":  # PuLID needs EVA02-CLIP features (tested in test_projectors)
        f = _features()
        f = identity_mod.IdentityFeatures(**{k: (None if v is None else v.to(next(again.projector.parameters()).dtype)) for k, v in vars(f).items()})
        assert torch.equal(original.projector.project(f), again.projector.project(f))
    for name, value in original.extras.items():
        assert torch.equal(again.extras[name], value) if isinstance(value, torch.Tensor) else again.extras[name] == value


def test_header_fields(tmp_path):
    state, _ = wf.ip_family_state("faceid", "sd15", seed=5, lora_rank=4)
    adapter = formats.convert(state)
    path = tmp_path / "faceid.safetensors"
    native.write_native(adapter, str(path))
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        keys = list(f.keys())
    assert header["format"] == "identity_attention" and header["version"] == "1"
    assert (header["base"], header["mechanism"], header["source_format"]) == ("sd15", "decoupled", "faceid")
    assert (header["context_dim"], header["num_tokens"], header["token_dim"]) == ("768", "4", "768")
    spec = json.loads(header["projector"])
    assert spec["class"] == "FaceIDProjection" and spec["config"]["num_tokens"] == 4
    assert json.loads(header["extras"])["lora"]["rank"] == 4
    assert "layers.middle.0.0.to_k" in keys and "layers.input.1.0.to_v" in keys
    assert "projector.proj.0.weight" in keys and "projector.norm.weight" in keys


def test_free_form_layers_without_projector(tmp_path):
    """Mechanisms without public weights store anything per layer (a router MLP here) and tensor extras."""
    layers = {
        ("input", 1, 0): {"router.0.weight": torch.randn(8, 32), "router.0.bias": torch.zeros(8), "router.2.weight": torch.randn(2, 8)},
        ("middle", 0, 0): {"router.0.weight": torch.randn(8, 128), "router.0.bias": torch.ones(8), "router.2.weight": torch.randn(2, 8)},
    }
    adapter = id_adapter.IdAdapter(
        format="native", base="sd15", context_dim=768, layers=layers, mechanism="mixture_of_attention",
        extras={"stage_tokens": torch.randn(5, 2, 768), "temperature": 0.5, "stages": [0.2, 0.4]}, metadata={"trained_on": "synthetic"},
    )
    path = tmp_path / "moa.safetensors"
    native.write_native(adapter, str(path))
    again = _read(path)
    assert again.projector is None and again.mechanism == "mixture_of_attention"
    _same_layers(adapter, again)
    assert torch.equal(again.extras["stage_tokens"], adapter.extras["stage_tokens"])
    assert again.extras["temperature"] == 0.5 and again.extras["stages"] == [0.2, 0.4]
    assert again.metadata["trained_on"] == "synthetic"


def test_views_sharing_storage_are_saved(tmp_path):
    kv = torch.randn(2, 32, 768)
    adapter = id_adapter.IdAdapter(format="native", base="sd15", context_dim=768, layers={("input", 1, 0): {"to_k": kv[0], "to_v": kv[1]}})
    native.write_native(adapter, str(tmp_path / "views.safetensors"))
    again = _read(tmp_path / "views.safetensors")
    assert torch.equal(again.layers[("input", 1, 0)]["to_v"], kv[1])


def _write(path, tensors, header):
    save_file(tensors, str(path), metadata=header)


def _good_header(**over):
    header = {"format": "identity_attention", "version": "1", "base": "sd15", "mechanism": "decoupled", "context_dim": "768", "num_tokens": "0", "token_dim": "768", "projector": "null", "extras": "{}", "metadata": "{}"}
    header.update(over)
    return header


@pytest.mark.parametrize(
    "tensors,header,message",
    [
        ({"layers.input.1.0.to_k": torch.zeros(2, 2)}, _good_header(version="2"), "version '2' is not supported"),
        ({"layers.input.1.0.to_k": torch.zeros(2, 2)}, _good_header(base="sd3"), "base model 'sd3'"),
        ({"weights.input.1.0.to_k": torch.zeros(2, 2)}, _good_header(), "belongs to no part"),
        ({"layers.input.x.0.to_k": torch.zeros(2, 2)}, _good_header(), "layers.<block>.<id>.<index>.<name>"),
        ({"projector.proj.weight": torch.zeros(2, 2)}, _good_header(projector='{"class": "Nope", "config": {}}'), "unknown token projector 'Nope'"),
        ({"layers.input.1.0.to_k": torch.zeros(2, 2)}, _good_header(extras="{not json"), "not valid JSON"),
    ],
)
def test_bad_native_headers(tmp_path, tensors, header, message):
    path = tmp_path / "bad.safetensors"
    _write(path, tensors, header)
    loaded = safe_load.read_weight_file(str(path))
    with pytest.raises(errors.WeightError, match=re.escape(message)):
        formats.convert(loaded.tensors, loaded.metadata)


def test_header_token_count_must_match_projector(tmp_path):
    state, _ = wf.ip_family_state("faceid", "sd15", seed=6)
    tensors, header = native.to_tensors(formats.convert(state))
    header["num_tokens"] = "16"
    with pytest.raises(errors.WeightError, match="header says 16 tokens"):
        native.from_tensors(tensors, header)
