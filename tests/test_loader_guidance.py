"""Loaders say what to get: a placeholder when nothing is downloaded, one error naming the file, where it goes,
its manifest id and the download command, and "incomplete or corrupt download" for a damaged known file."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

import weight_fixtures as wf
from conftest import pack

weights_nodes = pack("nodes.weights_nodes")
stage_token_nodes = pack("nodes.stage_token_nodes")
folders_mod = pack("nodes.folders")
node_errors = pack("nodes.errors")
guidance = pack("adapters.weights_guidance")
manifest_mod = pack("adapters.weights_manifest")

import folder_paths  # noqa: E402  (the in-process host, set up by conftest)

LOADER = weights_nodes.LoadIdentityAdapter
DOWNLOAD = "python -m comfyui-identity-attention.weights download"


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    """Empty adapter folders and an empty identity_attention folder."""
    out = {}
    for name in weights_nodes.ADAPTER_FOLDERS:
        path = tmp_path / name
        path.mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(path)], {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}))
        out[name] = path
    monkeypatch.setattr(folder_paths, "filename_list_cache", {}, raising=False)
    weights_nodes._ADAPTERS.clear()
    return out


def _error(fn, *args) -> str:
    with pytest.raises(node_errors.IdentityAttentionError) as err:
        fn(*args)
    return str(err.value)


def test_empty_folders_list_one_placeholder_that_says_what_to_do(folders, tiny):
    choices = LOADER.INPUT_TYPES()["required"]["adapter"][0]
    assert choices == [guidance.placeholder(weights_nodes.ADAPTER_FOLDERS)] and "queue the workflow" in choices[0]
    message = LOADER.VALIDATE_INPUTS(choices[0])
    assert message.startswith("Load identity adapter: input 'adapter': no weight file is in ")
    assert str(folders["ipadapter"]) in message and f"{DOWNLOAD} ID" in message and "weights list` shows them" in message
    assert _error(LOADER().load, choices[0], tiny.unet("sd15")) == message  # the same one error when it runs
    tokens = stage_token_nodes.LoadIdentityTokens.INPUT_TYPES()["required"]["tokens_name"][0]
    assert len(tokens) == 1 and guidance.is_placeholder(tokens[0])
    assert "Save identity tokens" in stage_token_nodes.LoadIdentityTokens.VALIDATE_INPUTS(tokens[0])


def test_a_missing_known_file_names_id_destination_command_and_url(folders, tiny):
    entry = manifest_mod.load_manifest().by_id["ip-adapter-faceid-plusv2_sd15"]
    value = "ipadapter/ip-adapter-faceid-plusv2_sd15.bin"
    message = LOADER.VALIDATE_INPUTS(value)
    assert message is not True
    for part in ("Load identity adapter: input 'adapter':", "not downloaded yet", "ip-adapter-faceid-plusv2_sd15 in weights_manifest.json",
                 "models/ipadapter/ip-adapter-faceid-plusv2_sd15.bin", str(folders["ipadapter"]),
                 f"`{DOWNLOAD} ip-adapter-faceid-plusv2_sd15`", entry["url"], "refresh the page"):
        assert part in message, part
    assert _error(LOADER().load, value, tiny.unet("sd15")) == message
    unknown = LOADER.VALIDATE_INPUTS("ipadapter/somebody_elses.safetensors")
    assert "not in the model folders" in unknown and "weights list" in unknown
    assert LOADER.VALIDATE_INPUTS(None) is True  # fed by a link: checked when it runs


def test_a_present_file_passes_validation_even_if_the_list_is_stale(folders):
    state, _ = wf.ip_family_state("ip_adapter", "sd15", seed=3)
    save_file(state, str(folders["ipadapter"] / "fresh.safetensors"))
    assert LOADER.VALIDATE_INPUTS("ipadapter/fresh.safetensors") is True


def test_unverified_entries_get_the_allow_unverified_flag(folders):
    message = LOADER.VALIDATE_INPUTS("identity_attention/adapter_maj_mask_large_new_reg001_faceshuffle_00290001.ckpt")
    assert f"{DOWNLOAD} fact-adapter-majicmix --allow-unverified" in message


def _tiny_manifest(monkeypatch, data: bytes, **change):
    entry = {
        "id": "tiny-adapter", "file": "tiny.safetensors", "folder": "ipadapter", "url": "https://huggingface.co/x/y/resolve/main/tiny.safetensors",
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "verified": True, "source": "test", "format": "ip_adapter",
        "base": "sd15", "license": "test", "nodes": ["IdentityAttentionLoadIdentityAdapter"], "description": "test",
    }
    entry.update(change)
    manifest = manifest_mod.Manifest({"schema": manifest_mod.SCHEMA, "entries": [entry]})
    monkeypatch.setattr(weights_nodes, "manifest_or_none", lambda *_: manifest)
    monkeypatch.setattr(folders_mod, "manifest_or_none", lambda *_: manifest)
    return entry


def test_a_truncated_known_file_is_an_incomplete_download_with_the_command_that_replaces_it(folders, tiny, monkeypatch):
    state, _ = wf.ip_family_state("ip_adapter", "sd15", seed=4)
    path = folders["ipadapter"] / "tiny.safetensors"
    save_file(state, str(path))
    whole = path.read_bytes()
    _tiny_manifest(monkeypatch, whole)
    path.write_bytes(whole[: len(whole) // 2])  # cut off mid-download
    message = _error(LOADER().load, "ipadapter/tiny.safetensors", tiny.unet("sd15"))
    assert "'tiny.safetensors' is an incomplete or corrupt download" in message and f"has {len(whole):,}" in message
    assert f"`{DOWNLOAD} tiny-adapter --force`" in message and "save https://huggingface.co/x/y/resolve/main/tiny.safetensors as models/ipadapter/tiny.safetensors" in message


def test_a_complete_size_with_other_bytes_is_corrupt_by_its_sha256(folders, tiny, monkeypatch):
    state, _ = wf.ip_family_state("ip_adapter", "sd15", seed=4)
    path = folders["ipadapter"] / "tiny.safetensors"
    save_file(state, str(path))
    whole = path.read_bytes()
    _tiny_manifest(monkeypatch, whole)
    path.write_bytes(b"\x00" * len(whole))  # right size, wrong bytes (a disk error, a proxy's error page padded...)
    message = _error(LOADER().load, "ipadapter/tiny.safetensors", tiny.unet("sd15"))
    assert "incomplete or corrupt download (its sha256 differs from the released file's)" in message and "--force" in message


def test_a_broken_file_the_manifest_does_not_know_keeps_its_own_error(folders, tiny):
    (folders["ipadapter"] / "mine.safetensors").write_bytes(b"\x00" * 64)
    message = _error(LOADER().load, "ipadapter/mine.safetensors", tiny.unet("sd15"))
    assert "incomplete or corrupt download" not in message and "input 'adapter'" in message


def test_guidance_for_a_face_pack_group():
    manifest = manifest_mod.load_manifest()
    err = guidance.missing_file("antelopev2", ("insightface",), ["/x/models/insightface"], manifest)
    assert "the antelopev2 set of 5 files" in err.problem and "models/insightface/models/antelopev2/" in err.problem
    assert f"`{DOWNLOAD} antelopev2`" in err.fix and "save " not in err.fix  # five files: the command, not one URL


@pytest.mark.host
def test_the_page_gets_the_message_before_the_prompt_runs(server):
    """Queued with its file missing, the loader is refused by /prompt with the guidance, not "Value not in list"."""
    from harness.server import PromptFailed

    # a manifest adapter for SD1.5 that no other test of this session has provisioned into the server's models
    entries = [e for e in manifest_mod.load_manifest().entries if e["folder"] == "ipadapter" and e["base"] == "sd15"]
    entry = next(e for e in entries if not (server.instance.models / "ipadapter" / e["file"]).exists())
    prompt = {
        "1": {"class_type": "IdentityAttentionTestKit_TinyModels", "inputs": {"arch": "sd15", "seed": 0}},
        "2": {"class_type": "IdentityAttentionLoadIdentityAdapter", "inputs": {"adapter": f"ipadapter/{entry['file']}", "model": ["1", 0], "verify_sha256": False}},
        "3": {"class_type": "IdentityAttentionTestKit_AdapterReport", "inputs": {"id_adapter": ["2", 0]}},
    }
    with pytest.raises(PromptFailed) as err:
        server.queue(prompt)
    text = str(err.value.node_errors)
    assert "Value not in list" not in text
    assert "not downloaded yet" in text and f"{DOWNLOAD} {entry['id']}" in text and f"models/ipadapter/{entry['file']}" in text
