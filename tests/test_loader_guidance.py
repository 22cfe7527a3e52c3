"""Loaders say what to get: a placeholder when nothing is downloaded, one error naming the file, where it goes,
its manifest id and the download command, and "incomplete or corrupt download" for a damaged known file."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

import weight_fixtures as wf
from conftest import pack

weights_nodes = pack("nodes.identity.weights_nodes")
stage_token_nodes = pack("nodes.stage_tokens.stage_token_nodes")
identity_nodes = pack("nodes.identity.identity_nodes")
folders_mod = pack("nodes.common.folders")
encoder_nodes = pack("nodes.identity.face_encoder_nodes")
pulid_nodes = pack("nodes.identity.pulid_nodes")
node_errors = pack("nodes.common.errors")
guidance = pack("adapters.weights.weights_guidance")
manifest_mod = pack("adapters.weights.weights_manifest")

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


# --- every other loader of the pack: face encoder, EVA-CLIP, face parsing ------------------------------------------

# (loader, input, folders, manifest id of the file it wants, the value a workflow names, a tiny file of the real layout)
GUIDED_LOADERS = [
    (encoder_nodes.LoadFaceEncoder, "encoder_name", ("identity_attention",), "transface-s", "ms1mv2_model_TransFace_S.pt",
     lambda: wf.transface_state_dict(depth=2, heads=False, seed=2)),
    (pulid_nodes.LoadEvaClip, "eva_clip_name", pulid_nodes.EVA_FOLDERS, "eva02-clip-l-336", "clip_vision/EVA02_CLIP_L_336_psz14_s6B.pt",
     lambda: wf.tiny_eva_state(seed=2)),
    (pulid_nodes.LoadFaceParsing, "parsing_name", pulid_nodes.PARSING_FOLDERS, "facexlib-parsing-bisenet", "facexlib/parsing_bisenet.pth",
     lambda: wf.bisenet_state(seed=2)),
    (pack("nodes.flux.flux_ip_adapter_nodes").LoadFluxIPAdapter, "adapter_file", ("ipadapter",), "xlabs-flux-ip-adapter", "ip_adapter.safetensors",
     lambda: __import__("test_flux_ip_adapter").xlabs_state(seed=2)),
    (pack("nodes.flux.flux_identity_pulid_nodes").LoadPuLIDFlux, "pulid_file", ("pulid",), "pulid-flux-v0.9.1", "pulid_flux_v0.9.1.safetensors",
     lambda: __import__("test_pulid_flux").tiny_pulid_flux_state(seed=2)),
]
IDS = [row[0].__name__ for row in GUIDED_LOADERS]


@pytest.fixture()
def empty_folders(tmp_path, monkeypatch):
    """Every folder those loaders read, empty."""
    out = {}
    for name in {f for row in GUIDED_LOADERS for f in row[2]}:
        path = tmp_path / name
        path.mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(path)], {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}))
        out[name] = path
    monkeypatch.setattr(folder_paths, "filename_list_cache", {}, raising=False)
    return out


@pytest.mark.parametrize("loader,input_name,folders,entry_id,value,make", GUIDED_LOADERS, ids=IDS)
def test_other_loaders_name_the_missing_file_its_place_id_and_command(empty_folders, loader, input_name, folders, entry_id, value, make):
    entry = manifest_mod.load_manifest().by_id[entry_id]
    message = loader.VALIDATE_INPUTS(**{input_name: value})
    assert message is not True
    unverified = "" if entry["sha256"] else " --allow-unverified"
    for part in (f"{loader.DISPLAY_NAME}: input '{input_name}':", "not downloaded yet", f"{entry_id} in weights_manifest.json",
                 f"models/{entry['folder']}/{entry['file']}", str(empty_folders[entry["folder"]]),
                 f"`{DOWNLOAD} {entry_id}{unverified}`", entry["url"], "refresh the page"):
        assert part in message, part
    assert _error(loader().load, value) == message
    assert loader.VALIDATE_INPUTS(**{input_name: None}) is True


@pytest.mark.parametrize("loader,input_name,folders,entry_id,value,make", GUIDED_LOADERS, ids=IDS)
def test_other_loaders_call_a_cut_off_known_file_an_incomplete_download(empty_folders, monkeypatch, loader, input_name, folders, entry_id, value, make):
    real = manifest_mod.load_manifest().by_id[entry_id]
    name = value.rpartition("/")[2]
    path = empty_folders[real["folder"]] / name
    torch.save(make(), str(path))  # .pt / .pth, as released
    whole = path.read_bytes()
    entry = dict(real, bytes=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    entry.pop("requires", None)  # a one-entry manifest: the ids it requires are not in it
    manifest = manifest_mod.Manifest({"schema": manifest_mod.SCHEMA, "entries": [entry]})
    monkeypatch.setattr(folders_mod, "manifest_or_none", lambda *_: manifest)
    assert loader.VALIDATE_INPUTS(**{input_name: value}) is True
    loader().load(value)  # the whole file loads
    path.write_bytes(whole[: len(whole) // 2])
    message = _error(loader().load, value)
    assert f"'{name}' is an incomplete or corrupt download ({len(whole) // 2:,} bytes, the released file has {len(whole):,})" in message
    assert f"`{DOWNLOAD} {entry_id} --force`" in message and f"save {entry['url']} as models/{entry['folder']}/{entry['file']} by hand" in message


def test_face_analysis_loader_says_which_pack_to_download(tmp_path, monkeypatch):
    loader = identity_nodes.LoadFaceAnalysis
    monkeypatch.setattr(identity_nodes, "folder_list", lambda name: [str(tmp_path / "insightface")])
    choices = loader.INPUT_TYPES()["required"]["pack"][0]
    assert choices == [identity_nodes.NO_PACKS]
    message = loader.VALIDATE_INPUTS(choices[0])
    assert message.startswith("Load face analysis model: input 'pack': no face analysis pack was found")
    assert str(tmp_path / "insightface" / "models") in message and "models/insightface/models/<pack>/" in message
    assert f"`{DOWNLOAD} antelopev2`" in message and f"`{DOWNLOAD} buffalo_l`" in message
    assert _error(loader().load, choices[0], "CPU", 640) == message  # the same one error when it runs
    message = loader.VALIDATE_INPUTS("buffalo_l")
    for part in ("Load face analysis model: input 'pack':", "'buffalo_l' is not downloaded yet", "the buffalo_l set of 5 files",
                 "models/insightface/models/buffalo_l/", str(tmp_path / "insightface" / "models"), f"`{DOWNLOAD} buffalo_l`"):
        assert part in message, part
    assert _error(loader().load, "buffalo_l", "CPU", 640) == message
    assert "'nobody' not found" in loader.VALIDATE_INPUTS("nobody") and loader.VALIDATE_INPUTS(None) is True
    (tmp_path / "insightface" / "models" / "buffalo_l").mkdir(parents=True)
    (tmp_path / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx").write_bytes(b"\x00" * 8)
    assert loader.VALIDATE_INPUTS("buffalo_l") is True  # there (whether it parses is the loader's business)


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


# --- every other loader of the pack: TransFace, EVA-CLIP, face parsing, face analysis -----------------------------

pulid_nodes = pack("nodes.identity.pulid_nodes")
face_encoder_nodes = pack("nodes.identity.face_encoder_nodes")

# (loader class, input name, its folders, the manifest id it reads, whether the value is <folder>/<file>)
GUIDED_LOADERS_PREFIXED = [
    (face_encoder_nodes.LoadFaceEncoder, "encoder_name", ("identity_attention",), "transface-s", False),
    (pulid_nodes.LoadEvaClip, "eva_clip_name", ("clip_vision", "pulid"), "eva02-clip-l-336", True),
    (pulid_nodes.LoadFaceParsing, "parsing_name", ("facexlib", "pulid"), "facexlib-parsing-bisenet", True),
    (pack("nodes.flux.flux_ip_adapter_nodes").LoadFluxIPAdapter, "adapter_file", ("ipadapter",), "xlabs-flux-ip-adapter", False),
    (pack("nodes.flux.flux_identity_pulid_nodes").LoadPuLIDFlux, "pulid_file", ("pulid",), "pulid-flux-v0.9.1", False),
]


def _value(entry: dict, prefixed: bool) -> str:
    return f"{entry['folder']}/{entry['file']}" if prefixed else entry["file"]


@pytest.mark.parametrize("loader, input_name, folders, entry_id, prefixed", GUIDED_LOADERS_PREFIXED, ids=[c[0].__name__ for c in GUIDED_LOADERS_PREFIXED])
def test_every_loader_lists_a_placeholder_and_names_its_file_when_nothing_is_downloaded(empty_folders, loader, input_name, folders, entry_id, prefixed):
    entry = manifest_mod.load_manifest().by_id[entry_id]
    choices = loader.INPUT_TYPES()["required"][input_name][0]
    assert len(choices) == 1 and guidance.is_placeholder(choices[0])
    message = loader.VALIDATE_INPUTS(choices[0])
    assert message.startswith(f"{loader.DISPLAY_NAME}: input '{input_name}': no weight file is in ")
    for part in (str(empty_folders[folders[0]]), f"this loader reads {entry_id} (goes to models/{entry['folder']}/{entry['file']})",
                 f"`{DOWNLOAD} {entry_id}", entry["url"], "refresh the page"):
        assert part in message, part
    assert ("--allow-unverified" in message) == (entry["sha256"] is None)
    assert _error(loader().load, choices[0]) == message  # the same one error when it runs
    assert loader.VALIDATE_INPUTS(None) is True  # fed by a link: checked when it runs


@pytest.mark.parametrize("loader, input_name, folders, entry_id, prefixed", GUIDED_LOADERS_PREFIXED, ids=[c[0].__name__ for c in GUIDED_LOADERS_PREFIXED])
def test_every_loader_names_id_destination_and_command_for_a_missing_known_file(empty_folders, loader, input_name, folders, entry_id, prefixed):
    entry = manifest_mod.load_manifest().by_id[entry_id]
    value = _value(entry, prefixed)
    message = loader.VALIDATE_INPUTS(value)
    for part in (f"input '{input_name}'", "not downloaded yet", f"{entry_id} in weights_manifest.json", f"models/{entry['folder']}/{entry['file']}",
                 f"`{DOWNLOAD} {entry_id}", entry["url"]):
        assert part in message, part
    assert "Value not in list" not in message and _error(loader().load, value) == message


def _fake_entry(monkeypatch, entry_id: str, data: bytes, **change) -> dict:
    """The real manifest with ``entry_id``'s size and sha256 replaced by those of ``data`` (the file 'as released')."""
    real = manifest_mod.load_manifest()
    entries = []
    for e in real.entries:
        e = dict(e)
        if e["id"] == entry_id:
            e.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), verified=True, source="test", **change)
        entries.append(e)
    manifest = manifest_mod.Manifest({"schema": manifest_mod.SCHEMA, "entries": entries})
    monkeypatch.setattr(folders_mod, "manifest_or_none", lambda *_: manifest)
    return next(e for e in entries if e["id"] == entry_id)


@pytest.mark.parametrize("loader, input_name, folders, entry_id, prefixed", GUIDED_LOADERS_PREFIXED, ids=[c[0].__name__ for c in GUIDED_LOADERS_PREFIXED])
def test_every_loader_calls_a_cut_off_known_file_an_incomplete_download(empty_folders, monkeypatch, loader, input_name, folders, entry_id, prefixed):
    entry = manifest_mod.load_manifest().by_id[entry_id]
    path = empty_folders[entry["folder"]] / entry["file"]
    save_file({"w": torch.randn(64, 64)}, str(path))
    whole = path.read_bytes()
    _fake_entry(monkeypatch, entry_id, whole)
    path.write_bytes(whole[: len(whole) // 3])  # cut off mid-download
    assert loader.VALIDATE_INPUTS(_value(entry, prefixed)) is True  # present: the check before the prompt passes
    message = _error(loader().load, _value(entry, prefixed))
    assert f"'{entry['file']}' is an incomplete or corrupt download" in message and f"has {len(whole):,}" in message
    assert f"`{DOWNLOAD} {entry_id} --force`" in message and f"input '{input_name}'" in message


@pytest.mark.parametrize("loader, input_name, folders, entry_id, prefixed", GUIDED_LOADERS_PREFIXED, ids=[c[0].__name__ for c in GUIDED_LOADERS_PREFIXED])
def test_every_loader_says_which_file_fits_for_another_networks_whole_file(empty_folders, loader, input_name, folders, entry_id, prefixed):
    """A whole file of another network (parses, other keys): not called a broken download, the fix names the right file."""
    folder = folders[0]
    save_file({"some.other.network.weight": torch.randn(8, 8)}, str(empty_folders[folder] / "other.safetensors"))
    value = f"{folder}/other.safetensors" if prefixed else "other.safetensors"
    assert loader.VALIDATE_INPUTS(value) is True
    message = _error(loader().load, value)
    assert "incomplete or corrupt" not in message and f"input '{input_name}'" in message and "choose " in message


def test_an_empty_folder_for_a_loader_with_many_fitting_files_keeps_the_short_message():
    manifest = manifest_mod.load_manifest()
    err = guidance.no_files(("ipadapter",), ["/x"], manifest, "IdentityAttentionLoadIdentityAdapter")
    assert "weights list` shows them" in err.fix and "this loader reads" not in err.problem
    two = guidance.no_files(("insightface",), ["/x"], manifest, "IdentityAttentionLoadFaceAnalysis")
    assert "this loader reads antelopev2" in two.problem or "this loader reads buffalo_l" in two.problem
    assert f"`{DOWNLOAD} antelopev2`" in two.fix and f"`{DOWNLOAD} buffalo_l`" in two.fix
