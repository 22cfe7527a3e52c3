"""Face packs with a ``manifest.json`` (insightface 2.1 model packages) are bounded like every other file
(issue 21, class 2): the manifest's size, its JSON, and every ONNX file it names (inside the pack, ONNX by
content not name, at most 2 GB, the published size when ``weights_manifest.json`` knows it) are checked
before insightface reads any of them. Each case goes through the real loader (``load_face_analysis``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import toy_faces
from conftest import pack

face_analysis = pack("adapters.faces.face_analysis")
face_pack_files = pack("adapters.faces.face_pack_files")

pytest.importorskip("insightface")


def _pack(tmp_path: Path) -> Path:
    """The toy pack, its files also under names weights_manifest.json does not know (no published size to match)."""
    pack_dir = toy_faces.copy_pack(toy_faces.toy_pack(), tmp_path / "models" / "mypack")
    (pack_dir / "det.onnx").write_bytes((pack_dir / "det_10g.onnx").read_bytes())
    (pack_dir / "rec.onnx").write_bytes((pack_dir / "w600k_r50.onnx").read_bytes())
    return pack_dir


def _v2(det="det.onnx", rec="rec.onnx"):
    return {"manifest_version": 2, "model_id": "mypack", "license": "MODEL.LICENSE",
            "tasks": {"detection": {"file": det}, "recognition": {"file": rec}}}


def _write_manifest(pack_dir: Path, doc) -> None:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    (pack_dir / "manifest.json").write_bytes(data)


def _refused(pack_dir: Path, *words):
    with pytest.raises(face_analysis.FaceAnalysisError) as info:
        face_analysis.load_face_analysis(pack_dir, provider="CPU", cpu_only=True)
    text = str(info.value)
    assert all(w in text for w in words), text
    assert getattr(info.value, "input_name", "pack") == "pack"
    return text


MANIFESTS = {
    "2 MB of spaces": (b"{" + b" " * (2 * 1024**2) + b"}", "over the"),
    "nesting bomb": (b"[" * 200_000 + b"]" * 200_000, "not valid JSON"),
    "not UTF-8": (b"\xff\xfe{\x00}", "not valid JSON"),
    "truncated JSON": (b'{"manifest_version": 2, "tasks": {', "not valid JSON"),
    "a JSON list": (b"[1, 2, 3]", "not a JSON object"),
    "a huge integer": (b'{"manifest_version": ' + b"9" * 5000 + b"}", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_bad_manifest_documents_are_refused_before_insightface_reads_them(tmp_path, case, monkeypatch):
    pack_dir = _pack(tmp_path)
    data, words = MANIFESTS[case]
    _write_manifest(pack_dir, data)
    import insightface.model_zoo.package_manifest as pm

    monkeypatch.setattr(pm, "has_model_package_manifest", lambda *a: pytest.fail("insightface read the manifest"))
    _refused(pack_dir, "manifest.json", words)


PATHS = {
    "parent folder": "../w600k_r50.onnx",
    "absolute": "/etc/hostname.onnx",
    "deep parent": "a/../../../x.onnx",
    "backslash parent": "..\\w600k_r50.onnx",
}


@pytest.mark.parametrize("case", sorted(PATHS))
def test_manifest_files_outside_the_pack_are_refused(tmp_path, case):
    pack_dir = _pack(tmp_path)
    (pack_dir.parent / "w600k_r50.onnx").write_bytes((pack_dir / "w600k_r50.onnx").read_bytes())
    _write_manifest(pack_dir, _v2(rec=PATHS[case]))
    _refused(pack_dir, "outside the pack")


def test_manifest_file_linked_out_of_the_pack_is_refused(tmp_path):
    pack_dir = _pack(tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes((pack_dir / "w600k_r50.onnx").read_bytes())
    os.symlink(outside, pack_dir / "linked.onnx")
    _write_manifest(pack_dir, _v2(rec="linked.onnx"))
    _refused(pack_dir, "outside the pack")


def test_manifest_itself_linked_out_of_the_pack_is_refused(tmp_path):
    pack_dir = _pack(tmp_path)
    outside = tmp_path / "m.json"
    outside.write_text(json.dumps(_v2()))
    os.symlink(outside, pack_dir / "manifest.json")
    _refused(pack_dir, "outside the pack")


def test_manifest_that_is_a_folder_is_refused(tmp_path):
    pack_dir = _pack(tmp_path)
    (pack_dir / "manifest.json").mkdir()
    _refused(pack_dir, "not a file")


CONTENTS = {
    "empty": (b"", "empty"),
    "safetensors renamed": (b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14, "not an ONNX model"),
    "zip renamed": (b"PK\x03\x04" + b"\x00" * 64, "not an ONNX model"),
    "pickle renamed": (b"\x80\x02}q\x00.", "not an ONNX model"),
    "HTML error page": (b"<!DOCTYPE html><html>404</html>", "not an ONNX model"),
}


@pytest.mark.parametrize("case", sorted(CONTENTS))
@pytest.mark.parametrize("task", ["detection", "recognition"])
def test_manifest_files_are_judged_by_content(tmp_path, case, task):
    pack_dir = _pack(tmp_path)
    data, words = CONTENTS[case]
    (pack_dir / "fake.onnx").write_bytes(data)
    _write_manifest(pack_dir, _v2(**{("det" if task == "detection" else "rec"): "fake.onnx"}))
    _refused(pack_dir, "fake.onnx", task, words)


def test_manifest_file_over_two_gigabytes_is_refused_unread(tmp_path):
    pack_dir = _pack(tmp_path)
    big = pack_dir / "big.onnx"
    with open(big, "wb") as f:  # sparse: no disk used
        f.write(b"\x08\x07")
        f.truncate(2 * 1024**3 + 1)
    _write_manifest(pack_dir, _v2(rec="big.onnx"))
    _refused(pack_dir, "big.onnx", "GB")


def test_manifest_file_with_wrong_published_size_is_refused(tmp_path):
    """``w600k_r50.onnx`` is buffalo_l's recognizer in weights_manifest.json (174,383,860 bytes); the toy one is not."""
    pack_dir = _pack(tmp_path)
    _write_manifest(pack_dir, _v2(rec="w600k_r50.onnx"))
    _refused(pack_dir, "w600k_r50.onnx", "published file", "buffalo_l-w600k_r50")


def test_whole_v2_package_passes_the_check_and_other_versions_are_left_alone(tmp_path):
    pack_dir = _pack(tmp_path)
    _write_manifest(pack_dir, _v2())
    problem, files = face_pack_files.check_pack_manifest(pack_dir, "mypack")
    assert problem is None and sorted(f.name for f in files) == ["det.onnx", "rec.onnx"]
    _write_manifest(pack_dir, {"manifest_version": 1, "tasks": {"recognition": {"file": "../../etc/passwd"}}})
    assert face_pack_files.check_pack_manifest(pack_dir, "mypack") == (None, [])  # insightface ignores V1
    (pack_dir / "manifest.json").unlink()
    assert face_pack_files.check_pack_manifest(pack_dir, "mypack") == (None, [])
