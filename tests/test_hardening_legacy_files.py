"""Legacy (pre-1.6, non-zip) PyTorch files that declare more memory than they hold (issue 21, class 2).

A legacy file names each storage with its element count before any data; ``torch.load``
allocates that count at once. The files here are written by hand (:func:`write_legacy`,
the same five pickles + data records that ``torch.save(..., _use_new_zipfile_serialization=False)``
writes) so the declared counts, the counts in the data records and the bytes present can each
lie. Every loader must refuse a lying file before allocating, with an error that names the file;
an honest hand-written file must load to the exact tensors (so the builder is right).
Also here: tensors that repeat one stored value (stride 0) to a huge shape, in both formats.
"""

from __future__ import annotations

import collections
import pickle
import struct
from pathlib import Path

import pytest
import torch

from conftest import pack

safe_load = pack("adapters.weights.safe_load")
legacy = pack("adapters.weights.legacy_torch_sizes")
WeightError = pack("adapters.weights.weight_errors").WeightError

MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_CLASSES = {torch.float32: torch.FloatStorage, torch.float16: torch.HalfStorage, torch.float64: torch.DoubleStorage,
                   torch.bfloat16: torch.BFloat16Storage, torch.int64: torch.LongStorage, torch.uint8: torch.ByteStorage}


class _Storage:
    def __init__(self, key, cls, numel):
        self.key, self.cls, self.numel = key, cls, numel


class _Tensor:
    def __init__(self, storage, shape, stride=None, offset=0):
        self.storage, self.shape, self.offset = storage, tuple(shape), offset
        if stride is None:
            stride, acc = [], 1
            for n in reversed(self.shape):
                stride.insert(0, acc)
                acc *= n
        self.stride = tuple(stride)

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel, None)
        return None


def write_legacy(path: Path, tensors, declared=None, record_numel=None, data=None, extra_keys=()):
    """A legacy file of ``{name: tensor}``.

    ``declared[name]``: the element count the object pickle declares (default: the real one);
    ``record_numel[name]``: the count written before the data; ``data[name]``: the raw bytes written.
    """
    declared, record_numel, data = declared or {}, record_numel or {}, data or {}
    storages, obj = {}, {}
    for i, (name, t) in enumerate(tensors.items()):
        key = str(1000 + i)
        st = _Storage(key, STORAGE_CLASSES[t.dtype], declared.get(name, t.numel()))
        storages[name] = (st, t)
        obj[name] = _Tensor(st, t.shape)
    with open(path, "wb") as f:
        for value in (MAGIC, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(value, f, protocol=2)
        _Pickler(f, protocol=2).dump(obj)
        pickle.dump([st.key for st, _ in storages.values()] + list(extra_keys), f, protocol=2)
        for name, (st, t) in storages.items():
            f.write(struct.pack("<q", record_numel.get(name, t.numel())))
            f.write(data.get(name, t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""))
    return path


LOADERS = {
    "read_weight_file": lambda p: safe_load.read_weight_file(str(p)).tensors,
    "load_pytorch_object": lambda p: safe_load.load_pytorch_object(str(p)),
}


@pytest.mark.parametrize("dtype", sorted(STORAGE_CLASSES, key=str))
def test_honest_hand_written_legacy_file_loads_exactly(tmp_path, dtype):
    t = (torch.arange(24, dtype=torch.float64) - 7).reshape(2, 3, 4).to(dtype)
    path = write_legacy(tmp_path / "honest.pt", {"w": t, "b": t[0, 0].clone()})
    loaded = safe_load.read_weight_file(str(path)).tensors
    assert loaded["w"].dtype == dtype and torch.equal(loaded["w"], t) and torch.equal(loaded["b"], t[0, 0])
    assert legacy.legacy_storage_problem(str(path), path.stat().st_size) is None


# (declared element count, element count of the data record, bytes written): every lie about the size
LYING = {
    "declares 2**40 floats": (2**40, 4, None),
    "declares 2**62 floats": (2**62, 4, None),
    "declares 1e9 floats, record agrees": (10**9, 10**9, None),
    "declares 2x the data": (8, 8, None),
    "declares one more element": (5, 5, None),
    "record says 4, data cut": (4, 4, b"\x00" * 7),
    "declares 3e8 doubles-size as float": (3 * 10**8, 4, None),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("case", sorted(LYING))
@pytest.mark.parametrize("name", ["big.pt", "big.bin", "big.safetensors", "big"])
def test_declared_storage_larger_than_file_is_refused_before_allocating(tmp_path, case, loader, name, monkeypatch):
    declared, record, raw = LYING[case]
    t = torch.ones(4)
    path = write_legacy(tmp_path / name, {"w": t}, declared={"w": declared}, record_numel={"w": record}, data={"w": raw} if raw is not None else None)
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load ran on a lying file"))
    with pytest.raises(WeightError) as info:
        LOADERS[loader](path)
    text = str(info.value)
    assert name in text and "declare" in text and "bytes" in text, text
    assert not calls


@pytest.mark.parametrize("count", [-1, -(2**40)])
def test_negative_element_counts_are_refused(tmp_path, count):
    path = write_legacy(tmp_path / "neg.pt", {"w": torch.ones(4)}, declared={"w": count})
    with pytest.raises(WeightError, match="declares"):
        safe_load.read_weight_file(str(path))


def test_many_storages_each_small_but_more_than_the_file_are_refused(tmp_path):
    tensors = {f"t{i}": torch.ones(8) for i in range(50)}
    path = write_legacy(tmp_path / "many.pt", tensors, declared={f"t{i}": 4096 for i in range(50)})
    with pytest.raises(WeightError, match="declare"):
        safe_load.read_weight_file(str(path))


def test_same_key_declared_twice_counts_its_largest_size(tmp_path):
    st = _Storage("1", torch.FloatStorage, 4)
    big = _Storage("1", torch.FloatStorage, 2**36)
    path = tmp_path / "twice.pt"
    with open(path, "wb") as f:
        for value in (MAGIC, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(value, f, protocol=2)
        _Pickler(f, protocol=2).dump({"a": _Tensor(st, (4,)), "b": _Tensor(big, (4,))})
        pickle.dump(["1"], f, protocol=2)
        f.write(struct.pack("<q", 4) + torch.ones(4).numpy().tobytes())
    assert "declare" in legacy.legacy_storage_problem(str(path), path.stat().st_size)


@pytest.mark.parametrize("cut", [1, 20, 60, 150])
def test_truncated_legacy_pickles_are_a_clear_error(tmp_path, cut):
    path = write_legacy(tmp_path / "cut.pt", {"w": torch.ones(4)})
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(WeightError) as info:
        safe_load.read_weight_file(str(path))
    assert "cut.pt" in str(info.value)


def test_scan_imports_nothing_and_counts_globals(tmp_path, monkeypatch):
    """The scan names classes but never imports them: a pickle naming os.system is only recorded."""
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        for value in (MAGIC, 1001, {}):
            pickle.dump(value, f, protocol=2)
        f.write(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
        pickle.dump([], f, protocol=2)
    assert legacy.legacy_storage_problem(str(path), path.stat().st_size) is None  # nothing declared, nothing run
    with pytest.raises(pack("adapters.weights.weight_errors").UnsafeFileError):
        safe_load.read_weight_file(str(path))
    monkeypatch.setattr(legacy, "MAX_GLOBALS", 3)
    many = tmp_path / "globals.pt"
    with open(many, "wb") as f:
        for value in (MAGIC, 1001, {}):
            pickle.dump(value, f, protocol=2)
        f.write(b"\x80\x02(" + b"".join(f"cm{i}\nn\n".encode() for i in range(5)) + b"l.")
        pickle.dump([], f, protocol=2)
    assert "different classes" in legacy.legacy_storage_problem(str(many), many.stat().st_size)


# --- stride-0 tensors: a few stored values repeated into a huge tensor ---------------------------

EXPANDED = {
    "1 value to 1e5 x 1e5": ((100_000, 100_000), (0, 0)),
    "1 value to 4e9": ((4_000_000_000,), (0,)),
    "a row repeated 1e7 times": ((10_000_000, 4), (0, 1)),
    "1 value to 64 MB": ((16 * 1024**2 + 1, 1), (0, 0)),
}


@pytest.mark.parametrize("fmt", ["legacy-by-hand", "zip", "legacy"])
@pytest.mark.parametrize("case", sorted(EXPANDED))
def test_tensors_that_repeat_stored_values_to_a_huge_shape_are_refused(tmp_path, case, fmt):
    shape, stride = EXPANDED[case]
    path = tmp_path / "views.pt"
    if fmt == "legacy-by-hand":
        st = _Storage("1", torch.FloatStorage, 4)
        with open(path, "wb") as f:
            for value in (MAGIC, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
                pickle.dump(value, f, protocol=2)
            _Pickler(f, protocol=2).dump({"w": _Tensor(st, shape, stride)})
            pickle.dump(["1"], f, protocol=2)
            f.write(struct.pack("<q", 4) + torch.ones(4).numpy().tobytes())
    else:
        base = torch.ones(4)
        view = base.as_strided(shape, stride)
        torch.save({"w": view}, path, _use_new_zipfile_serialization=(fmt == "zip"))
    assert path.stat().st_size < 64 * 1024
    for loader in LOADERS.values():
        with pytest.raises(WeightError) as info:
            loader(path)
        assert "views.pt" in str(info.value) and "expand" in str(info.value), str(info.value)


def test_ordinary_expanded_buffers_still_load(tmp_path):
    """``position_ids = arange(n).expand(1, -1)`` as CLIP checkpoints save it (a view the size of its storage)."""
    tensors = {"position_ids": torch.arange(257).expand(1, -1), "w": torch.randn(8, 8), "bias": torch.zeros(1).expand(1024)}
    for fmt in ("zip", "legacy"):
        path = tmp_path / f"clip_{fmt}.pt"
        torch.save(tensors, path, _use_new_zipfile_serialization=(fmt == "zip"))
        loaded = safe_load.read_weight_file(str(path)).tensors
        assert torch.equal(loaded["position_ids"], tensors["position_ids"]) and torch.equal(loaded["w"], tensors["w"])


# --- zip files whose records are compressed (torch.save stores them; a crafted file may deflate) ------


def _deflated_torch_zip(path: Path, payload_bytes: int, lie: bool) -> Path:
    import io
    import re
    import zipfile

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            data = b"\0" * payload_bytes if info.filename.endswith("data/0") else src.read(info.filename)
            z.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
    raw = bytearray(out.getvalue())
    if lie:  # declare 16 bytes for the 20 MB record, in the central directory and the local header
        for sig, name_at, size_at, name_len_at in ((b"PK\x01\x02", 46, 24, 28), (b"PK\x03\x04", 30, 22, 26)):
            for m in re.finditer(re.escape(sig), bytes(raw)):
                n = struct.unpack_from("<H", raw, m.start() + name_len_at)[0]
                if bytes(raw[m.start() + name_at : m.start() + name_at + n]).endswith(b"data/0"):
                    struct.pack_into("<I", raw, m.start() + size_at, 16)
    path.write_bytes(bytes(raw))
    return path


def test_deflated_records_are_bounded_by_their_declared_size(tmp_path):
    honest = _deflated_torch_zip(tmp_path / "deflated.pt", 20 * 1024**2, lie=False)
    assert honest.stat().st_size < 1024**2
    with pytest.raises(WeightError, match="would unpack to"):
        safe_load.read_weight_file(str(honest))
    # a header that under-declares: the reader inflates only the declared 16 bytes (the tensor's own)
    liar = _deflated_torch_zip(tmp_path / "liar.pt", 20 * 1024**2, lie=True)
    loaded = safe_load.read_weight_file(str(liar)).tensors
    assert torch.equal(loaded["w"], torch.zeros(4))
