"""Reading weight files safely: bad files, code-executing pickles, paths outside the model folders."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import pack

safe_load = pack("adapters.weights.safe_load")
errors = pack("adapters.weights.weight_errors")


def _good_safetensors(path):
    save_file({"image_proj.proj.weight": torch.randn(64, 16), "ip_adapter.1.to_k_ip.weight": torch.randn(8, 16)}, str(path), metadata={"note": "x"})
    return path


def test_reads_safetensors_with_metadata(tmp_path):
    loaded = safe_load.read_weight_file(str(_good_safetensors(tmp_path / "a.safetensors")))
    assert loaded.kind == "safetensors" and loaded.metadata == {"note": "x"}
    assert set(loaded.tensors) == {"image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"}


def test_reads_plain_pytorch_checkpoint_and_flattens(tmp_path):
    path = tmp_path / "a.bin"
    torch.save({"image_proj": {"proj.weight": torch.ones(2, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(3, 2)}, "step": 7}, str(path))
    loaded = safe_load.read_weight_file(str(path))
    assert loaded.kind == "pytorch" and set(loaded.tensors) == {"image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"}
    assert loaded.ignored == ["step"]


def test_content_not_name_decides(tmp_path):
    path = tmp_path / "looks_safe.safetensors"
    torch.save({"state_dict": {"module.w": torch.ones(2)}}, str(path))  # a pickle named .safetensors, wrapped twice
    loaded = safe_load.read_weight_file(str(path))
    assert loaded.kind == "pytorch" and list(loaded.tensors) == ["w"]


def test_truncated_safetensors(tmp_path):
    path = _good_safetensors(tmp_path / "t.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(errors.WeightError, match="damaged safetensors file"):
        safe_load.read_weight_file(str(path))
    path.write_bytes(data[:40])  # cut inside the JSON header
    with pytest.raises(errors.WeightError, match="damaged safetensors file"):
        safe_load.read_weight_file(str(path))


def test_bit_flipped_safetensors(tmp_path):
    path = _good_safetensors(tmp_path / "f.safetensors")
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    flipped = bytearray(data)
    flipped[8 + header_len // 2] ^= 0x04  # inside the JSON header
    path.write_bytes(bytes(flipped))
    with pytest.raises(errors.WeightError, match="damaged safetensors file"):
        safe_load.read_weight_file(str(path))
    # a flip in the tensor bytes is invisible to the format: only the sha256 check finds it
    good_hash = safe_load.sha256_file(str(_good_safetensors(tmp_path / "g.safetensors")))
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    safe_load.read_weight_file(str(path))
    assert safe_load.sha256_file(str(path)) != good_hash


def test_flipped_length_prefix_is_not_a_weight_file(tmp_path):
    path = _good_safetensors(tmp_path / "l.safetensors")
    data = bytearray(path.read_bytes())
    data[7] ^= 0x40  # header length now ~4.6e18
    path.write_bytes(bytes(data))
    with pytest.raises(errors.WeightError, match="neither a safetensors file nor a PyTorch checkpoint"):
        safe_load.read_weight_file(str(path))


def test_empty_and_tiny_files(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(errors.WeightError, match=r"is empty \(0 bytes\)"):
        safe_load.read_weight_file(str(empty))
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"abc")
    with pytest.raises(errors.WeightError, match="only 3 bytes long"):
        safe_load.read_weight_file(str(tiny))
    text = tmp_path / "readme.bin"
    text.write_text("this is not a model, just some text")
    with pytest.raises(errors.WeightError, match="neither a safetensors file"):
        safe_load.read_weight_file(str(text))


def test_damaged_pickle(tmp_path):
    path = tmp_path / "d.bin"
    torch.save({"w": torch.ones(100)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.WeightError, match="damaged PyTorch file"):
        safe_load.read_weight_file(str(path))


def test_incomplete_download_against_expected_size(tmp_path):
    path = _good_safetensors(tmp_path / "s.safetensors")
    size = path.stat().st_size
    with pytest.raises(errors.WeightError, match="the download is incomplete"):
        safe_load.read_weight_file(str(path), expected_bytes=size + 1)
    safe_load.read_weight_file(str(path), expected_bytes=size)


class _Payload:
    """Unpickling this runs ``open(marker, 'w').write('pwned')``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, container):
    marker_proof = tmp_path / "proof.txt"
    marker_ours = tmp_path / "ours.txt"
    evil_proof, evil = tmp_path / "proof.bin", tmp_path / "evil.bin"

    def save(obj, path):
        if container == "torch.save":
            torch.save(obj, str(path))
        else:
            path.write_bytes(pickle.dumps(obj, protocol=2))

    save({"payload": _Payload(marker_proof)}, evil_proof)
    save({"ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2), "payload": _Payload(marker_ours)}, evil)

    # proof that the payload is live: a plain unpickler (in a throwaway process) runs it and creates the file
    unsafe = (
        "import sys, pickle, zipfile; p = sys.argv[1]\n"
        "if zipfile.is_zipfile(p):\n"
        "    z = zipfile.ZipFile(p); pickle.loads(z.read([n for n in z.namelist() if n.endswith('data.pkl')][0]))\n"
        "else:\n"
        "    pickle.load(open(p, 'rb'))\n"
    )
    subprocess.run([sys.executable, "-c", unsafe, str(evil_proof)], check=True, cwd=str(tmp_path), capture_output=True, timeout=120)
    assert marker_proof.read_text() == "pwned"

    with pytest.raises(errors.UnsafeFileError, match="could run code"):
        safe_load.read_weight_file(str(evil))
    assert not marker_ours.exists()


def test_paths_outside_the_model_folders(tmp_path):
    root = tmp_path / "models" / "ipadapter"
    root.mkdir(parents=True)
    inside = _good_safetensors(root / "ok.safetensors")
    (root / "sub").mkdir()
    _good_safetensors(root / "sub" / "nested.safetensors")
    outside = _good_safetensors(tmp_path / "secret.safetensors")

    assert safe_load.resolve_in_folders("ok.safetensors", [str(root)]) == str(inside)
    assert safe_load.resolve_in_folders("sub/nested.safetensors", [str(root)]).endswith("nested.safetensors")
    for name in ("../../secret.safetensors", "sub/../../../secret.safetensors", str(outside), "/etc/passwd", "C:\\x.bin", "a\x00b"):
        with pytest.raises(errors.WeightError, match="points outside the model folders"):
            safe_load.resolve_in_folders(name, [str(root)])
    with pytest.raises(errors.WeightError, match="outside the model folders this node reads"):
        safe_load.read_weight_file(str(outside), roots=[str(root)])
    with pytest.raises(errors.WeightError, match="was not found"):
        safe_load.resolve_in_folders("missing.safetensors", [str(root)])
    safe_load.read_weight_file(str(inside), roots=[str(root)])


def test_symlinked_models_folder_still_works(tmp_path):
    real = tmp_path / "big_drive" / "ipadapter"
    real.mkdir(parents=True)
    _good_safetensors(real / "a.safetensors")
    link = tmp_path / "models_ipadapter"
    os.symlink(real, link)
    path = safe_load.resolve_in_folders("a.safetensors", [str(link)])
    safe_load.read_weight_file(path, roots=[str(link)])


def test_sha256_progress(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(300_000))
    seen = []
    digest = safe_load.sha256_file(str(path), progress=lambda done, total: seen.append((done, total)), chunk=100_000)
    import hashlib

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert seen == [(100_000, 300_000), (200_000, 300_000), (300_000, 300_000)]
