"""Face packs: which recognizer made an IDENTITY, its pairing with the adapter, the provider choice, damaged files.

Fake packs: tests/toy_faces.py's detector with recognizers built here. A recognizer of the
published network shape is a chain of tiny convolutions (53 for buffalo_l's IResNet-50,
103 for antelopev2's IResNet-100) with ArcFace's contract (3 x 112 x 112 -> 512); the
sha256 route uses a manifest written here that lists the toy recognizer's own digest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import toy_faces as toy
import weight_fixtures as wf
from conftest import pack

fa = pack("adapters.faces.face_analysis")
rid = pack("adapters.faces.recognizer_identity")
pack_files = pack("adapters.faces.face_pack_files")
manifest_mod = pack("adapters.weights.weights_manifest")
formats = pack("adapters.formats.weight_formats")
check = pack("nodes.common.recognizer_check")
identity_inputs = pack("nodes.pva.identity_inputs")
identity_nodes = pack("nodes.identity.identity_nodes")
errors = pack("nodes.common.errors")


def build_resnet_shaped_recognizer(path: Path, convolutions: int, seed: int = 0) -> Path:
    """ArcFace contract with ``convolutions`` Conv nodes: [N, 3, 112, 112] -> [N, 512]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(seed)
    inits, nodes = [], []
    prev, channels = "input.1", 4
    for i in range(convolutions):
        cin = 3 if i == 0 else channels
        inits += [numpy_helper.from_array((rng.randn(channels, cin, 3, 3) * 0.2).astype(np.float32), f"w{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[2, 2] if i == 0 else [1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev = f"r{i}"
    inits += [numpy_helper.from_array((rng.randn(channels, 512) * 0.5).astype(np.float32), "fc_w"),
              numpy_helper.from_array(np.zeros(512, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["embedding"])]
    graph = helper.make_graph(nodes, "resnet_shaped", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def fake_pack(root: Path, name: str, recognizer_file: str, convolutions=None, detector_file="det_10g.onnx") -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / detector_file).write_bytes((toy.toy_pack() / "det_10g.onnx").read_bytes())
    if convolutions is None:
        (folder / recognizer_file).write_bytes((toy.toy_pack() / "w600k_r50.onnx").read_bytes())
    else:
        build_resnet_shaped_recognizer(folder / recognizer_file, convolutions)
    return folder


def encode_one(model):
    img = toy.blank(480, 640)
    toy.plant(img, 256, 192, 32, toy.astronaut_face())
    return fa.encode_identity(model, img).identity


# --------------------------------------------------------------------------------------------- identification


def test_recognizers_identified_by_name_and_network(tmp_path):
    buffalo = fake_pack(tmp_path, "buffalo_l", "w600k_r50.onnx", 53)
    antelope = fake_pack(tmp_path, "antelopev2", "glintr100.onnx", 103, detector_file="scrfd_10g_bnkps.onnx")
    b = fa.load_face_analysis(buffalo, "CPU", 640)
    a = fa.load_face_analysis(antelope, "CPU", 640)
    assert b.recognizer_id.space == "buffalo_l" and a.recognizer_id.space == "antelopev2"
    assert "53 convolutions" in b.recognizer_id.evidence and "not the published bytes" in b.recognizer_id.evidence
    assert b.recognizer_id.sha256 is None  # not the published size: never hashed
    assert "buffalo_l's w600k_r50.onnx" in b.report() and "IP-Adapter-FaceID" in b.report() and "WARNING" not in b.report()
    assert "InstantID, PuLID" in a.report()
    identity = encode_one(b)
    assert identity.recognizer_id == b.recognizer_id and identity.recognizer == "buffalo_l/w600k_r50.onnx"

    # the published name on another network, or the right network under another name: not identified
    wrong_net = fake_pack(tmp_path, "odd", "glintr100.onnx", 53)
    renamed = fake_pack(tmp_path, "renamed", "recognizer.onnx", 103)
    toy_pack = fake_pack(tmp_path, "toy", "w600k_r50.onnx")
    for folder in (wrong_net, renamed, toy_pack):
        found = rid.identify_recognizer(folder / next(p.name for p in folder.iterdir() if "det" not in p.name), folder.name)
        assert found.space is None and "neither the published file nor the network" in found.evidence
    report = fa.load_face_analysis(toy_pack, "CPU", 640).report()
    assert "WARNING: recognizer toy/w600k_r50.onnx: not identified" in report and "1 convolutions" in report


def test_recognizer_identified_by_the_published_sha256(tmp_path):
    """A manifest listing the toy recognizer's bytes as buffalo_l's: found by digest whatever its name or folder."""
    folder = fake_pack(tmp_path, "my_faces", "recognizer.onnx")
    data = (folder / "recognizer.onnx").read_bytes()
    real = manifest_mod.load_manifest()
    entries = [dict(e) for e in real.entries]
    for e in entries:
        if e["id"] == "buffalo_l-w600k_r50":
            e["sha256"], e["bytes"] = toy.file_digest(folder / "recognizer.onnx"), len(data)
    manifest = manifest_mod.Manifest({"schema": manifest_mod.SCHEMA, "entries": entries})
    found = rid.identify_recognizer(folder / "recognizer.onnx", "my_faces", manifest)
    assert found.space == "buffalo_l" and found.sha256 == toy.file_digest(folder / "recognizer.onnx")
    assert found.evidence == "sha256 equals the published buffalo_l-w600k_r50"
    assert rid.identify_recognizer(folder / "recognizer.onnx", "my_faces").space is None  # the real manifest: unknown


def test_every_manifest_adapter_requires_the_pack_its_format_was_trained_on():
    m = manifest_mod.load_manifest()
    checked = 0
    for e in m.entries:
        if e["format"] in rid.FORMAT_SPACES:
            packs = [r for r in e.get("requires", []) if r in rid.SPACES]
            assert packs == [rid.FORMAT_SPACES[e["format"]]], e["id"]
            assert rid.expected_space(e["format"], None, e.get("requires", [])) == packs[0]
            checked += 1
    assert checked >= 7  # FaceID sd15/sdxl, Plus, PlusV2 sd15/sdxl, InstantID, PuLID
    for known in rid.KNOWN_RECOGNIZERS:  # the identities the pack checks against are the manifest's files
        entry = m.by_id[known.manifest_id]
        assert entry["file"] == f"models/{known.space}/{known.file}" and entry["verified"]
    assert rid.expected_space("ip_adapter_plus") is None and rid.expected_space("native", "faceid") == "buffalo_l"


# --------------------------------------------------------------------------------------------- pairing


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    root = tmp_path_factory.mktemp("packs")
    out = {}
    for name, file, convs in (("buffalo_l", "w600k_r50.onnx", 53), ("antelopev2", "glintr100.onnx", 103), ("toy", "w600k_r50.onnx", None)):
        out[name] = encode_one(fa.load_face_analysis(fake_pack(root, name, file, convs), "CPU", 640))
    return out


def adapter_of(fmt, base="sd15", policy=None, face_pack=None):
    state, _ = wf.ip_family_state(fmt, base, seed=3)
    adapter = formats.convert(state)
    if policy is not None:
        adapter.extras["recognizer_check"] = policy
    if face_pack is not None:
        adapter.extras["face_pack"] = face_pack
    return adapter


def test_mismatch_is_an_error_naming_both_and_the_fix(identities):
    faceid = adapter_of("faceid")
    with pytest.raises(errors.IdentityAttentionError) as err:
        identity_inputs.identity_tokens(faceid, identities["antelopev2"], False, "Apply parallel visual attention")
    text = str(err.value)
    assert text.startswith("Apply parallel visual attention: input 'identity': the identity was made with antelopev2/glintr100.onnx")
    assert "IP-Adapter-FaceID adapter was trained on buffalo_l embeddings (w600k_r50.onnx)" in text
    assert "load buffalo_l for IP-Adapter-FaceID files" in err.value.fix and "recognizer_check" in err.value.fix
    instantid = adapter_of("instantid", "sdxl")
    with pytest.raises(errors.IdentityAttentionError, match="load antelopev2 for InstantID files"):
        identity_inputs.identity_tokens(instantid, identities["buffalo_l"], False, "Apply parallel visual attention")
    # the right pairs make tokens
    assert identity_inputs.identity_tokens(faceid, identities["buffalo_l"], False, "n").cond.shape[1] == 4
    assert identity_inputs.identity_tokens(instantid, identities["antelopev2"], False, "n").cond.shape[1] == 16
    # the other helper (face adapter / nested attention nodes) runs the same check
    token_inputs = pack("nodes.common.identity_token_inputs")
    with pytest.raises(errors.IdentityAttentionError, match="load buffalo_l for IP-Adapter-FaceID-Plus files"):
        token_inputs.identity_tokens(adapter_of("faceid_plus"), identities["antelopev2"], False, "Apply nested attention")


def test_override_and_unknown_recognizers_warn(identities, caplog):
    caplog.set_level(logging.WARNING, logger="identity_attention")
    warn = adapter_of("faceid", policy="warn")
    tokens = identity_inputs.identity_tokens(warn, identities["antelopev2"], False, "Apply parallel visual attention")
    assert tokens.cond.shape[1] == 4
    assert "antelopev2/glintr100.onnx" in caplog.text and "recognizer_check is 'warn'" in caplog.text
    caplog.clear()
    off = adapter_of("faceid", policy="off")
    assert check.check_recognizer(off, identities["antelopev2"], "n") == "not_checked" and not caplog.text
    # a recognizer the pack cannot identify: a warning, never an error, even under policy error
    assert check.check_recognizer(adapter_of("faceid"), identities["toy"], "Apply parallel visual attention") == "unknown"
    assert "could not be identified" in caplog.text and "toy/w600k_r50.onnx" in caplog.text
    # an adapter that needs no particular recognizer is not checked
    assert check.check_recognizer(adapter_of("ip_adapter"), identities["antelopev2"], "n") == "not_checked"
    # an IDENTITY without a recorded recognizer (older graphs, synthetic ones) is unknown, not an error
    bare = identities["buffalo_l"].__class__(faces=identities["buffalo_l"].faces, recognizer="synthetic")
    assert check.check_recognizer(adapter_of("instantid", "sdxl"), bare, "n") == "unknown"
    # the manifest's requires (recorded by the loader) wins over the format
    assert check.check_recognizer(adapter_of("faceid", face_pack="antelopev2"), identities["antelopev2"], "n") == "ok"


def test_loader_node_carries_the_policy_and_says_which_pack(tmp_path, monkeypatch, tiny):
    import folder_paths
    from safetensors.torch import save_file

    weights_nodes = pack("nodes.identity.weights_nodes")
    for name in weights_nodes.ADAPTER_FOLDERS:
        (tmp_path / name).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(tmp_path / name)], {".safetensors", ".bin"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {}, raising=False)
    weights_nodes._ADAPTERS.clear()
    state, _ = wf.ip_family_state("faceid", "sd15", seed=1)
    save_file(state, str(tmp_path / "ipadapter" / "my_faceid.safetensors"))
    spec = weights_nodes.LoadIdentityAdapter.INPUT_TYPES()["optional"]["recognizer_check"]
    assert spec[0] == ["error", "warn", "off"] and spec[1]["default"] == "error" and spec[1]["tooltip"]
    node = weights_nodes.LoadIdentityAdapter()
    adapter, info = node.load("ipadapter/my_faceid.safetensors", tiny.unet("sd15"))
    assert adapter.extras["recognizer_check"] == "error" and adapter.extras["face_pack"] == "buffalo_l"
    assert "face pack: buffalo_l (its w600k_r50.onnx embedding" in info
    warned, _ = node.load("ipadapter/my_faceid.safetensors", tiny.unet("sd15"), recognizer_check="warn")
    assert warned.extras["recognizer_check"] == "warn" and adapter.extras["recognizer_check"] == "error"  # copies, not shared
    assert node.load("ipadapter/my_faceid.safetensors", tiny.unet("sd15"), recognizer_check="warn")[0] is warned
    with pytest.raises(errors.IdentityAttentionError, match="input 'recognizer_check'"):
        node.load("ipadapter/my_faceid.safetensors", tiny.unet("sd15"), recognizer_check="maybe")


# --------------------------------------------------------------------------------------------- provider


@pytest.fixture
def cuda_onnxruntime(monkeypatch):
    """onnxruntime that claims a CUDA provider; records the providers every model is created with."""
    from insightface.model_zoo import model_zoo

    monkeypatch.setattr(fa, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    asked = []
    real = model_zoo.get_model

    def get_model(*args, **kwargs):
        asked.append(list(kwargs.get("providers") or []))
        kwargs["providers"] = ["CPUExecutionProvider"]  # no GPU here: run it on the CPU whatever was asked
        kwargs["provider_options"] = None
        return real(*args, **kwargs)

    monkeypatch.setattr(model_zoo, "get_model", get_model)
    return asked


@pytest.mark.parametrize("cpu_only, gpu, expected", [
    (True, True, "auto -> CPU: ComfyUI runs on the CPU (--cpu)"),
    (False, False, "auto -> CPU: no usable CUDA device (torch.cuda.is_available() is False)"),
])
def test_auto_takes_the_cpu_without_trying_cuda(monkeypatch, cuda_onnxruntime, cpu_only, gpu, expected):
    monkeypatch.setattr(fa, "torch_cuda_usable", lambda: gpu)
    model = fa.load_face_analysis(toy.toy_pack(), "auto", 640, cpu_only=cpu_only)
    assert model.provider == "CPU" and model.provider_reason == expected and f"provider: {expected}" in model.report()
    assert cuda_onnxruntime and all(p == ["CPUExecutionProvider"] for p in cuda_onnxruntime)  # never a CUDA session


def test_auto_takes_cuda_when_everything_has_it(monkeypatch, cuda_onnxruntime):
    monkeypatch.setattr(fa, "torch_cuda_usable", lambda: True)
    choice = fa.choose_provider("auto", 1)
    assert choice.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"] and choice.ctx_id == 1
    assert choice.reason == "auto -> CUDA, device 1"
    model = fa.load_face_analysis(toy.toy_pack(), "auto", 640)
    assert cuda_onnxruntime[0][0] == "CUDAExecutionProvider"
    # the session really runs on the CPU here: the report says onnxruntime fell back
    assert model.provider == "CPU" and "could not start CUDA" in model.provider_reason
    monkeypatch.setattr(fa, "torch_cuda_usable", lambda: False)
    with pytest.raises(fa.FaceAnalysisError, match="no usable CUDA device"):
        fa.choose_provider("CUDA")
    monkeypatch.setattr(fa, "available_providers", lambda: ["CPUExecutionProvider"])
    assert fa.choose_provider("auto").reason == "auto -> CPU: this onnxruntime has no CUDA provider"


def test_node_reads_the_host_cpu_flag(monkeypatch, cuda_onnxruntime, tmp_path):
    import comfy.model_management as mm
    from comfy.cli_args import args

    toy.copy_pack(toy.toy_pack(), tmp_path / "models" / "toypack")
    monkeypatch.setattr(identity_nodes, "folder_list", lambda name: [str(tmp_path)])
    monkeypatch.setattr(fa, "torch_cuda_usable", lambda: True)
    monkeypatch.setattr(args, "cpu", True)
    assert identity_nodes.host_runs_on_cpu()
    _, info = identity_nodes.LoadFaceAnalysis().load("toypack", "auto", 640)
    assert "provider: auto -> CPU: ComfyUI runs on the CPU (--cpu)" in info
    assert all(p == ["CPUExecutionProvider"] for p in cuda_onnxruntime)
    monkeypatch.setattr(args, "cpu", False)
    monkeypatch.setattr(mm, "cpu_state", mm.CPUState.GPU)
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    assert not identity_nodes.host_runs_on_cpu()


# --------------------------------------------------------------------------------------------- damaged files


def test_truncated_recognizer_is_named_with_the_download_command(tmp_path):
    folder = fake_pack(tmp_path, "buffalo_l", "w600k_r50.onnx")
    data = (folder / "w600k_r50.onnx").read_bytes()
    (folder / "w600k_r50.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(fa.FaceAnalysisError) as err:
        fa.load_face_analysis(folder, "CPU", 640, name="buffalo_l")
    text, fix = str(err.value), err.value.fix
    assert "Protobuf" not in text  # onnxruntime's words are replaced by what happened
    assert f"w600k_r50.onnx is incomplete: {len(data) // 2:,} bytes, the published file (buffalo_l-w600k_r50) has 174,383,860" in text
    assert "so it has no face recognizer" in text
    assert "python -m comfyui-identity-attention.weights download buffalo_l-w600k_r50 --force" in fix
    assert err.value.input_name == "pack"


def test_truncated_file_outside_the_manifest_says_it_does_not_parse(tmp_path):
    folder = fake_pack(tmp_path, "my_pack", "recognizer.onnx")
    data = (folder / "recognizer.onnx").read_bytes()
    (folder / "recognizer.onnx").write_bytes(data[: len(data) - 100])
    with pytest.raises(fa.FaceAnalysisError) as err:
        fa.load_face_analysis(folder, "CPU", 640)
    assert "recognizer.onnx is incomplete or corrupt: it does not parse as an ONNX model" in str(err.value)
    assert "delete recognizer.onnx and download the pack again" in err.value.fix
    # a whole file is not reported as damaged
    assert pack_files.damaged_file_problem(toy.toy_pack() / "w600k_r50.onnx", "toypack") is None


# --------------------------------------------------------------------------------------------- example workflows

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "example_workflows").glob("*.json"))


def _upstream(workflow: dict, node: dict, input_type: str, stop_type: str, depth: int = 0):
    """The ``stop_type`` nodes reached from ``node`` going up through inputs of ``input_type`` (bounded)."""
    import json  # noqa: F401 - the workflow is already parsed

    if node["type"] == stop_type:
        return [node]
    if depth > 20:
        return []
    by_id = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    found = []
    for inp in node.get("inputs", []):
        if inp.get("type") == input_type and inp.get("link") is not None:
            found += _upstream(workflow, by_id[links[inp["link"]][1]], input_type, stop_type, depth + 1)
    return found


def _pairs(node: dict):
    """(adapter input, identity input) pairs of a node that turns an identity into tokens."""
    adapters = [i for i in node.get("inputs", []) if i.get("type") == "ID_ADAPTER" and i.get("link") is not None]
    identities = [i for i in node.get("inputs", []) if i.get("type") == "IDENTITY" and i.get("link") is not None]
    if len(adapters) == 1 and len(identities) == 1:
        return [(adapters[0], identities[0])]
    return [(a, i) for a in adapters for i in identities if a["name"].split("_")[0] == i["name"].split("_")[0]]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflows_feed_each_adapter_the_pack_it_was_trained_on(path):
    import json

    workflow = json.loads(path.read_text())
    manifest = manifest_mod.load_manifest()
    by_id = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        for adapter_input, identity_input in _pairs(node):
            loaders = _upstream(workflow, by_id[links[adapter_input["link"]][1]], "ID_ADAPTER", "IdentityAttentionLoadIdentityAdapter")
            encoders = _upstream(workflow, by_id[links[identity_input["link"]][1]], "IDENTITY", "IdentityAttentionEncodeIdentity")
            assert loaders and encoders, f"{path.name}: {node['type']} {adapter_input['name']}/{identity_input['name']} not traced"
            for loader in loaders:
                folder, _, name = loader["widgets_values"][0].partition("/")
                entry = manifest.find(folder, name)
                need = rid.expected_space(entry["format"], None, entry.get("requires", []))
                for encoder in encoders:
                    (analysis,) = _upstream(workflow, encoder, "FACE_ANALYSIS", "IdentityAttentionLoadFaceAnalysis")
                    pack_name = analysis["widgets_values"][0]
                    assert need is None or pack_name == need, (
                        f"{path.name}: {entry['id']} needs {need} but {identity_input['name']} comes from {pack_name}")
