"""Resource bombs in weight files, and every dtype a weight file can hold (issue 21, classes 2 and 3).

Bombs: a small torch file whose containers share references expands to billions of
paths when a naive walk follows every reference. Every loader of the pack
(``safe_load.read_weight_file`` and ``load_pytorch_object``; the face encoder; the
trainer's resume; cached training features; face-pack ONNX files) must finish in
bounded time and memory: it either loads the file (each shared container expanded
once) or refuses it with :class:`WeightError`. Each bomb shape is tried in both
PyTorch formats (zip and the legacy pickle) and under a name that lies about the format.
"""

from __future__ import annotations

import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import weight_fixtures as wf
from conftest import pack

safe_load = pack("adapters.weights.safe_load")
weight_errors = pack("adapters.weights.weight_errors")
WeightError = weight_errors.WeightError


def shared_dicts(levels: int, width: int):
    """``levels`` dicts, each holding the one below under ``width`` keys: ``width ** levels`` paths, ``levels`` objects."""
    d = {"w": torch.ones(2)}
    for _ in range(levels):
        d = {f"k{i}": d for i in range(width)}
    return d


def shared_lists(levels: int, width: int):
    x = [torch.ones(1)]
    for _ in range(levels):
        x = [x] * width
    return {"w": torch.ones(1), "extra": x}


def shared_tuples_in_dict(levels: int, width: int):
    x = (1,)
    for _ in range(levels):
        x = (x,) * width
    return {"w": torch.ones(1), "t": x, "again": x}


def deep_list(depth: int):
    x = [torch.ones(1)]
    for _ in range(depth):
        x = [x]
    return {"w": torch.ones(1), "deep": x}


def deep_dict(depth: int):
    d = {"w": torch.ones(1)}
    for _ in range(depth):
        d = {"d": d}
    return d


def mixed(levels: int, width: int):
    d = {"w": torch.ones(1)}
    for i in range(levels):
        d = {f"k{j}": (d if j % 2 else [d, d]) for j in range(width)}
    return d


EXPANDING = {  # loads (each shared container once) in bounded time
    "dicts 12 levels x 10": lambda: shared_dicts(12, 10),
    "dicts 16 levels x 4": lambda: shared_dicts(16, 4),
    "dicts 8 levels x 60": lambda: shared_dicts(8, 60),
    "lists 14 levels x 10": lambda: shared_lists(14, 10),
    "tuples 12 levels x 8": lambda: shared_tuples_in_dict(12, 8),
    "mixed 10 levels x 6": lambda: mixed(10, 6),
}
REFUSED = {  # refused with a WeightError naming the limit
    "dicts 40 levels x 10": (lambda: shared_dicts(40, 10), "nested more than"),
    "lists 30 levels x 10": (lambda: shared_lists(30, 10), "nested more than"),
    "list 300 deep": (lambda: deep_list(300), "nested more than"),
    "dict 200 deep": (lambda: deep_dict(200), "nested more than"),
    "tuples 40 levels x 3": (lambda: shared_tuples_in_dict(40, 3), "nested more than"),
}
FORMATS = ["zip", "legacy"]
NAMES = ["bomb.pt", "bomb.safetensors", "bomb.bin", "bomb.onnx", "bomb"]


def _save(obj, path: Path, fmt: str) -> Path:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # the pickler recurses per nesting level
    try:
        torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    finally:
        sys.setrecursionlimit(limit)
    return path


def _timed(fn, *args):
    start = time.monotonic()
    try:
        return fn(*args), None
    except WeightError as err:
        return None, err
    finally:
        assert time.monotonic() - start < 20, "a bounded walk took too long"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", sorted(EXPANDING))
def test_shared_containers_load_once(tmp_path, shape, fmt):
    path = _save(EXPANDING[shape](), tmp_path / "bomb.pt", fmt)
    assert path.stat().st_size < 64 * 1024
    loaded, err = _timed(safe_load.read_weight_file, str(path))
    assert err is None, err
    assert len(loaded.tensors) <= 4  # one tensor per distinct path actually expanded, not width**levels
    assert len(loaded.ignored) < 2000
    obj, err = _timed(safe_load.load_pytorch_object, str(path))
    assert err is None and isinstance(obj, dict)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", sorted(REFUSED))
def test_deep_or_huge_containers_are_refused(tmp_path, shape, fmt, name):
    build, message = REFUSED[shape]
    path = _save(build(), tmp_path / name, fmt)
    for loader in (safe_load.read_weight_file, safe_load.load_pytorch_object):
        _, err = _timed(loader, str(path))
        assert err is not None and message in str(err) and "memory bomb" in str(err), err
        assert name in str(err)


@pytest.mark.parametrize("count", [1001, 5000])
def test_too_many_entries_are_refused(tmp_path, monkeypatch, count):
    monkeypatch.setattr(safe_load, "MAX_ENTRIES", 1000)
    path = _save({"w": torch.ones(1), "steps": list(range(count))}, tmp_path / "many.pt", "zip")
    with pytest.raises(WeightError, match="more than 1,000 entries"):
        safe_load.read_weight_file(str(path))
    with pytest.raises(WeightError, match="more than 1,000 entries"):
        safe_load.check_object_bounds({str(i): torch.ones(1) for i in range(count)})


def test_bounds_count_each_object_once():
    inner = {"a": 1, "b": 2}
    assert safe_load.check_object_bounds({"x": inner, "y": inner, "z": [inner, inner]}) == 3 + 2 + 2
    flat, ignored = safe_load.flatten({"x": {"t": torch.ones(1)}, "y": None})
    assert list(flat) == ["x.t"] and ignored == ["y"]
    shared = {"t": torch.ones(1)}
    flat, ignored = safe_load.flatten({"a": shared, "b": shared})
    assert list(flat) == ["a.t"] and ignored == ["b (same as a)"]


def test_zip_inflation_is_refused_by_every_loader(tmp_path):
    path = tmp_path / "ms1mv2_model_TransFace_S.safetensors"  # the name lies: content decides
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}." + b"\x00" * (32 * 2**20))
    for loader in (safe_load.read_weight_file, safe_load.load_pytorch_object):
        with pytest.raises(WeightError, match="would unpack to"):
            loader(str(path))
    encoder_nodes = pack("nodes.identity.face_encoder_nodes")
    errors = pack("nodes.common.errors")
    with pytest.raises(errors.IdentityAttentionError, match="would unpack to") as info:
        encoder_nodes.load_face_encoder(str(path))
    assert "encoder_name" in str(info.value)


@pytest.mark.parametrize("shape", ["dicts 40 levels x 10", "list 300 deep"])
def test_face_encoder_and_trainer_resume_are_bounded(tmp_path, shape):
    encoder_nodes = pack("nodes.identity.face_encoder_nodes")
    errors = pack("nodes.common.errors")
    build, message = REFUSED[shape]
    path = _save(build(), tmp_path / "encoder.safetensors", "zip")  # a pickle under a safetensors name
    with pytest.raises(errors.IdentityAttentionError, match=message):
        encoder_nodes.load_face_encoder(str(path))
    trainer = pack("nodes.training.trainer")
    with pytest.raises(WeightError, match=message):
        trainer.Trainer.resume(object.__new__(trainer.Trainer), str(path))


def test_face_encoder_reads_by_content_not_name(tmp_path):
    encoder_nodes = pack("nodes.identity.face_encoder_nodes")
    sd = wf.transface_state_dict(depth=1, heads=False)
    path = tmp_path / "encoder.safetensors"  # really a torch zip
    torch.save({"state_dict": sd, "epoch": 3}, path)
    assert encoder_nodes.load_face_encoder(str(path)).model.depth == 1


def test_cached_training_features_are_read_through_the_safe_loader(tmp_path):
    training_data = pack("adapters.training.training_data")
    path = _save(shared_dicts(40, 10), tmp_path / "x.id.safetensors", "zip")
    with pytest.raises(WeightError, match="nested more than"):
        training_data.load_features(str(path))


ONNX_BAD = {
    "empty": (b"", "empty"),
    "safetensors renamed": (b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14, "not an ONNX model"),
    "zip renamed": (b"PK\x03\x04" + b"\x00" * 40, "not an ONNX model"),
    "pickle renamed": (b"\x80\x04\x95" + b"\x00" * 40, "not an ONNX model"),
    "text": (b"this is not an onnx file", "not an ONNX model"),
}


@pytest.mark.parametrize("case", sorted(ONNX_BAD))
def test_onnx_files_are_judged_by_content_and_size(tmp_path, case):
    data, message = ONNX_BAD[case]
    path = tmp_path / "det_10g.onnx"
    path.write_bytes(data)
    assert message in safe_load.onnx_file_problem(str(path))


def test_onnx_size_limit_and_real_models(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert safe_load.onnx_file_problem(str(path)) is None
    assert "over the" in safe_load.onnx_file_problem(str(path), max_bytes=8)


# --- every dtype (class 3) -----------------------------------------------------------------------------

formats = pack("adapters.formats.weight_formats")
dtypes = pack("adapters.weights.weight_dtypes")

FLOAT8_NAMES = [n for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, n)]
KEPT = ["float16", "bfloat16", "float32", "float64"]
REFUSED_DTYPES = {
    "complex64": "complex numbers", "complex128": "complex numbers", "complex32": "complex numbers",
    "bool": "true/false values",
    "int8": "integers", "int16": "integers", "int32": "integers", "int64": "integers", "uint8": "integers",
    **{n: "integers" for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)},
}


def _cast(state, dtype):
    return {k: (v.to(dtype) if dtype != torch.bool else v > 0) for k, v in state.items()}


def _write(tmp_path, tensors, fmt):
    path = tmp_path / ("adapter.safetensors" if fmt == "safetensors" else "adapter.bin")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


def _adapter_state():
    return wf.ip_family_state("ip_adapter", "sd15", scale=16, seed=1)[0]


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch"])
@pytest.mark.parametrize("name", FLOAT8_NAMES + KEPT)
def test_float_dtypes_load_exactly(tmp_path, name, fmt):
    dtype = getattr(torch, name)
    state = _cast(_adapter_state(), dtype)
    path = _write(tmp_path, state, fmt)
    adapter = formats.convert(safe_load.read_weight_file(str(path)).tensors)
    for entries in adapter.layers.values():
        for t in entries.values():
            assert t.dtype == (torch.float32 if name.startswith("float8") else dtype)
    _, where = wf.ip_family_state("ip_adapter", "sd15", scale=16, seed=1)
    for file_key, layer_key in list(where.items())[:3]:
        got, stored = adapter.layers[layer_key]["to_k"], state[file_key]
        if name.startswith("float8"):  # float8 -> float32 is exact: converting back gives the stored bits
            got, stored = got.to(dtype).view(torch.uint8), stored.view(torch.uint8)
        assert torch.equal(got, stored)


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch"])
@pytest.mark.parametrize("name", sorted(REFUSED_DTYPES))
def test_other_dtypes_are_refused_by_name(tmp_path, name, fmt):
    dtype = getattr(torch, name)
    state = _adapter_state()
    victim = sorted(state)[3]
    state[victim] = _cast({victim: state[victim] * 10}, dtype)[victim]
    try:
        path = _write(tmp_path, state, fmt)
    except (TypeError, ValueError, RuntimeError, KeyError):
        pytest.skip(f"{fmt} cannot store {name}")
    try:
        tensors = safe_load.read_weight_file(str(path)).tensors
    except WeightError as err:  # the reader itself may refuse an exotic dtype: then by a clear WeightError
        assert "damaged" in str(err) or name in str(err)
        return
    with pytest.raises(WeightError) as info:
        formats.convert(tensors)
    text = str(info.value)
    assert name in text and REFUSED_DTYPES[name] in text and victim in text, text
    assert "integers" not in text or REFUSED_DTYPES[name] == "integers"


@pytest.mark.parametrize("name", FLOAT8_NAMES + sorted(REFUSED_DTYPES))
def test_face_encoder_and_identity_tokens_apply_the_same_rule(tmp_path, name):
    encoder_nodes = pack("nodes.identity.face_encoder_nodes")
    errors = pack("nodes.common.errors")
    dtype = getattr(torch, name)
    sd = wf.transface_state_dict(depth=1, heads=False)
    sd = {k: (v.to(dtype) if dtype != torch.bool else v > 0) for k, v in sd.items()}
    path = tmp_path / "encoder.pt"
    try:
        torch.save(sd, path)
    except (TypeError, RuntimeError):
        pytest.skip(f"torch.save cannot store {name}")
    if name.startswith("float8"):
        assert encoder_nodes.load_face_encoder(str(path)).model.depth == 1
    else:
        with pytest.raises(errors.IdentityAttentionError, match=name):
            encoder_nodes.load_face_encoder(str(path))


def test_integer_index_buffers_are_kept():
    out = dtypes.usable_weights({"vision.position_ids": torch.arange(4), "w": torch.ones(2, dtype=torch.float8_e4m3fn)})
    assert out["vision.position_ids"].dtype == torch.int64 and out["w"].dtype == torch.float32
