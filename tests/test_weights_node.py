"""The "Load identity adapter" node, in process (the host's folder_paths, tiny models) and in a real server."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

import weight_fixtures as wf
from conftest import pack

weights_nodes = pack("nodes.identity.weights_nodes")
node_errors = pack("nodes.common.errors")
manifest_mod = pack("adapters.weights.weights_manifest")
formats = pack("adapters.formats.weight_formats")
safe_load = pack("adapters.weights.safe_load")

import folder_paths  # noqa: E402  (the in-process host, set up by conftest)


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    """Point the four adapter folders at empty temporary folders."""
    out = {}
    for name in weights_nodes.ADAPTER_FOLDERS:
        path = tmp_path / name
        path.mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(path)], {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}))
        out[name] = path
    monkeypatch.setattr(folder_paths, "filename_list_cache", {}, raising=False)
    weights_nodes._ADAPTERS.clear()
    weights_nodes._VERIFIED.clear()
    return out


def _write(path, state):
    save_file(state, str(path))
    return path


def test_lists_files_of_all_adapter_folders(folders):
    _write(folders["ipadapter"] / "a.safetensors", {"x": torch.zeros(1)})
    (folders["pulid"] / "sub").mkdir()
    _write(folders["pulid"] / "sub" / "b.safetensors", {"x": torch.zeros(1)})
    (folders["identity_attention"] / "notes.txt").write_text("not a weight file")
    choices = weights_nodes.LoadIdentityAdapter.INPUT_TYPES()["required"]["adapter"][0]
    assert choices == ["ipadapter/a.safetensors", "pulid/sub/b.safetensors"]


def test_loads_and_checks_against_the_model(folders, tiny):
    state, where = wf.ip_family_state("faceid_plus", "sd15", seed=1, lora_rank=4)
    _write(folders["ipadapter"] / "my_faceid_plus.safetensors", state)
    node = weights_nodes.LoadIdentityAdapter()
    adapter, info = node.load("ipadapter/my_faceid_plus.safetensors", tiny.unet("sd15"))
    assert adapter.format == "faceid_plus" and adapter.base == "sd15" and len(adapter.layers) == 16
    for name, key in where.items():
        assert torch.equal(adapter.layers[key]["to_k"], state[name])
        assert adapter.layers[key]["to_k"].device.type == "cpu"
    assert "IP-Adapter-FaceID-Plus" in info and "4 x 768" in info and "LoraLoaderModelOnly" in info
    assert "PlusV2" in info and "sha256: not checked" in info
    again, _ = node.load("ipadapter/my_faceid_plus.safetensors", tiny.unet("sd15"))
    assert again is adapter  # cached: changing only the MODEL does not read the file again


def test_sdxl_adapter_on_sd15_model(folders, tiny):
    state, _ = wf.ip_family_state("instantid", "sdxl", seed=2)
    torch.save(wf.nested_ip(state), str(folders["instantid"] / "ip-adapter-copy.bin"))
    with pytest.raises(node_errors.IdentityAttentionError) as err:
        weights_nodes.LoadIdentityAdapter().load("instantid/ip-adapter-copy.bin", tiny.unet("sd15"))
    text = str(err.value)
    assert text.startswith("Load identity adapter: input 'model':")
    assert "SDXL" in text and "SD1.5" in text and "Fix:" in text


@pytest.mark.parametrize("choice", ["ipadapter/../../secret.safetensors", "checkpoints/model.safetensors", "ipadapter//etc/passwd", "nothing"])
def test_choices_outside_the_folders(folders, tiny, choice):
    _write(folders["ipadapter"].parent / "secret.safetensors", {"x": torch.zeros(1)})
    with pytest.raises(node_errors.IdentityAttentionError, match="input 'adapter'"):
        weights_nodes.LoadIdentityAdapter().load(choice, tiny.unet("sd15"))


def test_known_name_with_wrong_content(folders, tiny):
    """A file under a released name: size sanity (too small) and, on request, the sha256."""
    state, _ = wf.ip_family_state("ip_adapter", "sd15", seed=3)
    _write(folders["ipadapter"] / "ip-adapter_sd15.safetensors", state)
    node = weights_nodes.LoadIdentityAdapter()
    with pytest.raises(node_errors.IdentityAttentionError, match="the released file is 44,642,768 bytes: the download is incomplete"):
        node.load("ipadapter/ip-adapter_sd15.safetensors", tiny.unet("sd15"))
    with pytest.raises(node_errors.IdentityAttentionError, match="is not the published file ip-adapter_sd15.*download ip-adapter_sd15 --force"):
        node.load("ipadapter/ip-adapter_sd15.safetensors", tiny.unet("sd15"), verify_sha256=True)


def test_verify_without_published_hash(folders, tiny):
    state, _ = wf.ip_family_state("ip_adapter", "sd15", seed=4)
    _write(folders["identity_attention"] / "mine.safetensors", state)
    with pytest.raises(node_errors.IdentityAttentionError, match="no published sha256 for 'identity_attention/mine.safetensors'"):
        weights_nodes.LoadIdentityAdapter().load("identity_attention/mine.safetensors", tiny.unet("sd15"), verify_sha256=True)


def test_verify_success_with_progress(folders, tiny, monkeypatch):
    import comfy.utils

    state, _ = wf.ip_family_state("ip_adapter", "sd15", seed=5)
    path = _write(folders["identity_attention"] / "listed.safetensors", state)
    data = path.read_bytes()
    entry = {
        "id": "listed", "file": "listed.safetensors", "folder": "identity_attention", "url": "https://example.invalid/listed",
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "verified": True, "source": "test", "format": "ip_adapter",
        "base": "sd15", "license": "test", "nodes": ["IdentityAttentionLoadIdentityAdapter"], "description": "test",
    }
    manifest = manifest_mod.Manifest({"schema": manifest_mod.SCHEMA, "entries": [entry]})
    monkeypatch.setattr(weights_nodes, "manifest_or_none", lambda *_: manifest)
    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview=None, **kw: calls.append((value, total)))
    adapter, info = weights_nodes.LoadIdentityAdapter().load("identity_attention/listed.safetensors", tiny.unet("sd15"), verify_sha256=True)
    assert "sha256: verified" in info and adapter.format == "ip_adapter"
    assert calls and calls[-1][0] == calls[-1][1]  # the bar reached its end


def test_faceid_plus_version_from_released_sizes():
    manifest = manifest_mod.load_manifest()
    assert weights_nodes._hints(manifest, 156_558_503)["faceid_plus_shortcut"] is False  # ip-adapter-faceid-plus_sd15.bin (v1)
    assert weights_nodes._hints(manifest, 156_558_509)["faceid_plus_shortcut"] is True  # ...-plusv2_sd15.bin
    assert weights_nodes._hints(manifest, 1_487_555_181)["faceid_plus_shortcut"] is True  # ...-plusv2_sdxl.bin
    unknown = weights_nodes._hints(manifest, 12345)
    assert unknown["faceid_plus_shortcut"] is True and "assumed" in unknown["faceid_plus_reason"]


def test_unsafe_pickle_reported_on_the_adapter_input(folders, tiny, tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')",))

    torch.save({"ip_adapter.1.to_k_ip.weight": torch.zeros(1), "p": Payload()}, str(folders["ipadapter"] / "evil.bin"))
    with pytest.raises(node_errors.IdentityAttentionError, match="input 'adapter'.*could run code"):
        weights_nodes.LoadIdentityAdapter().load("ipadapter/evil.bin", tiny.unet("sd15"))
    assert not (tmp_path / "pwned").exists()


# --- the real server ------------------------------------------------------------------------------


@pytest.mark.host
def test_node_in_a_real_comfyui(server, instance):
    state, _ = wf.ip_family_state("ip_adapter_plus", "sd15", seed=6)
    name = "identity_attention_test_plus_sd15.safetensors"
    _write(instance.models / "ipadapter" / name, state)
    sdxl_state, _ = wf.ip_family_state("faceid", "sdxl", seed=7)
    sdxl_name = "identity_attention_test_faceid_sdxl.bin"
    torch.save(wf.nested_ip(sdxl_state), str(instance.models / "ipadapter" / sdxl_name))

    info = server.object_info()["IdentityAttentionLoadIdentityAdapter"]
    assert info["category"] == "identity_attention/weights" and info["display_name"] == "Load identity adapter"
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert set(inputs) == {"adapter", "model", "verify_sha256", "recognizer_check", "faceid_v2_structure"}
    assert all(spec[1].get("tooltip") for spec in inputs.values())
    assert f"ipadapter/{name}" in inputs["adapter"][0] and f"ipadapter/{sdxl_name}" in inputs["adapter"][0]
    assert info["output"] == ["ID_ADAPTER", "STRING"] and info["output_name"] == ["id_adapter", "info"]
    if "output_tooltips" in info:  # newer hosts publish them
        assert len(info["output_tooltips"]) == 2

    prompt = {
        "1": {"class_type": "IdentityAttentionTestKit_TinyModels", "inputs": {"arch": "sd15", "seed": 0}},
        "2": {"class_type": "IdentityAttentionLoadIdentityAdapter", "inputs": {"adapter": f"ipadapter/{name}", "model": ["1", 0], "verify_sha256": False}},
        "3": {"class_type": "IdentityAttentionTestKit_AdapterReport", "inputs": {"id_adapter": ["2", 0]}},
    }
    entry = server.run(prompt)
    report = entry["outputs"]["3"]["adapter"][0]
    expected = formats.convert(state)
    assert (report["format"], report["base"], report["context_dim"]) == ("ip_adapter_plus", "sd15", 768)
    assert sorted(tuple(k) for k in report["layers"]) == sorted(expected.layers)
    assert report["projector"] == ["PerceiverResampler", "clip_hidden", 16, 768]
    layer_sum = sum(float(t.double().sum()) for e in expected.layers.values() for t in e.values())
    assert report["layer_checksum"] == pytest.approx(layer_sum, rel=1e-12)
    assert report["projector_checksum"] == pytest.approx(sum(float(t.double().sum()) for t in expected.projector.state_dict().values()), rel=1e-12)

    from harness.server import PromptFailed

    prompt["2"]["inputs"]["adapter"] = f"ipadapter/{sdxl_name}"
    with pytest.raises(PromptFailed) as err:
        server.run(prompt)
    message = err.value.exception_message()
    assert "Load identity adapter" in message and "SDXL" in message and "SD1.5" in message
