"""The weights manifest and the download command, against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, pack

cli = pack("weights")
manifest_mod = pack("adapters.weights.weights_manifest")

NODE_IDS = sorted(pack("nodes").NODE_CLASS_MAPPINGS)  # every node the pack registers


# --- the shipped manifest -------------------------------------------------------------------------


def test_shipped_manifest_is_valid_and_covers_the_required_files():
    data = json.loads((REPO / "weights_manifest.json").read_text())
    assert manifest_mod.validate_manifest(data, node_ids=NODE_IDS) == []
    m = manifest_mod.load_manifest()
    by_id = m.by_id
    required = [
        "ip-adapter_sd15", "ip-adapter-plus_sd15", "ip-adapter-plus-face_sd15", "ip-adapter-full-face_sd15", "ip-adapter_sdxl_vit-h",
        "ip-adapter-plus-face_sdxl_vit-h", "ip-adapter-faceid_sd15", "ip-adapter-faceid_sd15_lora", "ip-adapter-faceid-plusv2_sd15",
        "ip-adapter-faceid-plusv2_sd15_lora", "ip-adapter-faceid_sdxl", "ip-adapter-faceid_sdxl_lora", "ip-adapter-faceid-plusv2_sdxl",
        "ip-adapter-faceid-plusv2_sdxl_lora", "instantid-ip-adapter", "pulid-v1.1", "fact-adapter-majicmix", "transface-s", "clip-vit-h",
    ]
    for eid in required:
        assert eid in by_id, eid
    assert {"antelopev2", "buffalo_l"} <= set(m.groups())
    assert {e["file"].split("/")[-1] for e in m.groups()["antelopev2"]} >= {"scrfd_10g_bnkps.onnx", "glintr100.onnx"}
    assert {e["file"].split("/")[-1] for e in m.groups()["buffalo_l"]} >= {"det_10g.onnx", "w600k_r50.onnx"}
    # sizes known from mechanisms.md
    assert by_id["ip-adapter_sd15"]["bytes"] == 44_642_768
    assert by_id["instantid-ip-adapter"]["bytes"] == 1_691_134_141
    assert by_id["pulid-v1.1"]["bytes"] == 984_405_232
    assert by_id["ip-adapter-faceid_sd15_lora"]["bytes"] == 51_059_544
    assert by_id["ip-adapter-faceid_sdxl_lora"]["bytes"] == 371_842_896
    # what could not be verified says so instead of inventing values
    for e in m.entries:
        if not e["verified"]:
            assert e["note"] and (e["sha256"] is None or e["bytes"] is None)


@pytest.mark.parametrize(
    "change,problem",
    [
        ({"sha256": "ABC"}, "sha256 must be 64 lowercase hex"),
        ({"bytes": 0}, "bytes must be a positive integer"),
        ({"verified": True, "sha256": None}, "verified is true but"),
        ({"file": "../../evil.bin"}, "relative '/'-separated path"),
        ({"folder": "upscale_models"}, "folder 'upscale_models'"),
        ({"url": "http://example.com/x"}, "url must be https"),
        ({"base": "sd3"}, "base 'sd3'"),
        ({"nodes": ["SomeoneElse"]}, "IdentityAttention"),
        ({"description": "two\nlines"}, "one line"),
        ({"surprise": 1}, "unknown field 'surprise'"),
        ({"requires": ["nothing-like-this"]}, "requires unknown id"),
    ],
)
def test_manifest_validator_catches(change, problem):
    data = json.loads((REPO / "weights_manifest.json").read_text())
    data["entries"][0].update(change)
    problems = manifest_mod.validate_manifest(data, node_ids=NODE_IDS)
    assert any(problem in p for p in problems), problems


def test_no_network_code_outside_the_download_command():
    """Only adapters/weights/weights_download.py may open connections (the CLI imports it lazily)."""
    pattern = re.compile(r"^\s*(import|from)\s+(urllib|http\.client|socket|requests|httpx|aiohttp)\b", re.M)
    offenders = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(("tests/", ".venv/", ".cache/", "benchmarks/", "scripts/")) or rel == "adapters/weights/weights_download.py":
            continue
        if pattern.search(path.read_text(encoding="utf-8", errors="replace")):
            offenders.append(rel)
    assert offenders == []


# --- a local server with Range support ------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        data = srv.files.get(self.path)
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and self.path not in srv.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = srv.cut_once.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture()
def http():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.cut_once, srv.ignore_range = {}, [], {}, set()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _entry(eid, url, data, **over):
    e = {
        "id": eid, "file": f"{eid}.bin", "folder": "identity_attention", "url": url, "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data), "verified": True, "source": "test server", "format": "native", "base": "sd15", "license": "test",
        "nodes": ["IdentityAttentionLoadIdentityAdapter"], "description": f"test file {eid}",
    }
    e.update(over)
    return e


@pytest.fixture()
def setup(tmp_path, http):
    data = os.urandom(300_000)
    other = os.urandom(5_000)
    http.files.update({"/blob.bin": data, "/other.onnx": other, "/unverified.bin": other})
    entries = [
        _entry("blob", http.base + "/blob.bin", data),
        _entry("badhash", http.base + "/blob.bin", data, sha256="0" * 64),
        _entry("unverified", http.base + "/unverified.bin", other, sha256=None, bytes=None, verified=False, note="no published hash"),
        _entry("det", http.base + "/other.onnx", other, file="models/testpack/det.onnx", folder="insightface", format="onnx", base="any", group="testpack"),
    ]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"schema": "identity-attention-weights/1", "entries": entries}))
    models = tmp_path / "models"
    models.mkdir()

    def run(*args):
        out = io.StringIO()
        code = cli.main(["--manifest", str(path), "--models-dir", str(models), *args], out=out)
        return code, out.getvalue()

    return run, models, data, other


def test_download_verifies_and_renames(setup, http, capsys):
    run, models, data, _ = setup
    code, text = run("download", "blob")
    assert code == 0 and "sha256 verified" in text
    dest = models / "identity_attention" / "blob.bin"
    assert dest.read_bytes() == data and not Path(str(dest) + ".part").exists()
    assert "blob: " in capsys.readouterr().err  # progress line
    # present and valid: no second request
    n = len(http.requests)
    code, text = run("download", "blob")
    assert code == 0 and "already present" in text and len(http.requests) == n


def test_hash_mismatch_is_refused_and_nothing_kept(setup):
    run, models, _, _ = setup
    code, text = run("download", "badhash")
    assert code == 1 and "refused and deleted" in text
    dest = models / "identity_attention" / "badhash.bin"
    assert not dest.exists() and not Path(str(dest) + ".part").exists()


def test_interrupted_transfer_resumes_with_range(setup, http):
    run, models, data, _ = setup
    http.cut_once["/blob.bin"] = 100_000
    code, text = run("download", "blob")
    dest = models / "identity_attention" / "blob.bin"
    part = Path(str(dest) + ".part")
    assert code == 1 and "run the same command again" in text
    assert not dest.exists() and part.stat().st_size == 100_000
    code, text = run("download", "blob")
    assert code == 0 and dest.read_bytes() == data and not part.exists()
    assert http.requests[-1] == ("/blob.bin", "bytes=100000-")


def test_server_ignoring_range_restarts_cleanly(setup, http):
    run, models, data, _ = setup
    http.cut_once["/blob.bin"] = 50_000
    assert run("download", "blob")[0] == 1
    http.ignore_range.add("/blob.bin")
    code, _ = run("download", "blob")
    assert code == 0 and (models / "identity_attention" / "blob.bin").read_bytes() == data


def test_unverified_needs_consent(setup):
    run, models, _, other = setup
    code, text = run("download", "unverified")
    assert code == 1 and "--allow-unverified" in text and not (models / "identity_attention" / "unverified.bin").exists()
    code, text = run("download", "unverified", "--allow-unverified")
    assert code == 0 and hashlib.sha256(other).hexdigest() in text


def test_group_download_into_insightface_layout_and_verify(setup):
    run, models, data, other = setup
    assert run("download", "testpack")[0] == 0
    assert (models / "insightface" / "models" / "testpack" / "det.onnx").read_bytes() == other
    assert run("download", "blob")[0] == 0
    code, text = run("verify")
    assert code == 0 and "OK          blob" in text and "OK          det" in text
    (models / "identity_attention" / "blob.bin").write_bytes(b"x" + data[1:])
    code, text = run("verify", "blob")
    assert code == 1 and "MISMATCH" in text
    code, text = run("download", "blob")
    assert code == 1 and "--force" in text
    assert run("download", "blob", "--force")[0] == 0
    assert (models / "identity_attention" / "blob.bin").read_bytes() == data


def test_verify_with_nothing_installed_says_so(setup):
    run, models, _, _ = setup
    code, text = run("verify")
    assert code == 0 and "nothing to verify" in text and str(models) in text and "download ID" in text


def test_a_failed_download_says_where_to_save_the_url_by_hand(setup, http):
    run, models, _, _ = setup
    http.cut_once["/blob.bin"] = 100_000
    code, text = run("download", "blob")
    dest = models / "identity_attention" / "blob.bin"
    assert code == 1 and f"blob: or download it in a browser: save {http.base}/blob.bin as {dest}" in text


def test_unknown_id(setup):
    run, *_ = setup
    code, text = run("download", "nope")
    assert code == 2 and "unknown id or group: nope" in text


# --- invocation with the folder name ComfyUI-Manager uses -----------------------------------------


@pytest.fixture()
def comfy_tree(tmp_path):
    root = tmp_path / "ComfyUI"
    (root / "custom_nodes").mkdir(parents=True)
    (root / "models").mkdir()
    link = root / "custom_nodes" / "comfyui-identity-attention"
    link.symlink_to(REPO, target_is_directory=True)
    return root, link


def test_python_m_with_hyphenated_folder(comfy_tree):
    root, _ = comfy_tree
    result = subprocess.run(
        [sys.executable, "-m", "comfyui-identity-attention.weights", "list"],
        cwd=str(root / "custom_nodes"), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "ip-adapter_sd15" in result.stdout and " no " in result.stdout  # found ComfyUI/models: "present" column filled


def test_running_the_file_and_default_models_dir(comfy_tree):
    root, link = comfy_tree
    (root / "models" / "ipadapter").mkdir()
    (root / "models" / "ipadapter" / "ip-adapter_sd15.safetensors").write_bytes(b"not the real file")
    result = subprocess.run([sys.executable, str(link / "weights.py"), "verify"], capture_output=True, text=True, timeout=120, cwd=str(root))
    assert result.returncode == 1 and "MISMATCH" in result.stdout and str(root / "models") in result.stdout
    assert cli.default_models_dir(str(link)) == str(root / "models")
    assert cli.default_models_dir(str(REPO)) is None or "custom_nodes" in str(REPO.parent)
