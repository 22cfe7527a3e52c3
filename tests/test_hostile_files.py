"""Hostile files: a fuzzer over the weight loader and the manifest parser, and the path rules.

What may come out (the documented errors; anything else is a bug):

- the weight loader (``safe_load.read_weight_file`` -> ``weight_formats.convert`` ->
  ``check_against_model``; ``native_format.from_tensors``): an ID_ADAPTER, or
  :class:`WeightError` (``UnsafeFileError`` for pickles that hold code). No other
  exception, no hang, and never code from the file: every pickle the fuzzer builds
  would write a sentinel file if anything unpickled it (a plain ``pickle.loads`` in a
  throwaway process does, see ``test_the_fuzzers_payloads_are_live``); it must never appear.
- the manifest: ``validate_manifest`` returns a list of problems and never raises;
  ``Manifest(data)`` raises only ``ValueError``; ``load_manifest(path)`` only
  ``OSError`` / ``ValueError``. A manifest that validates only ever names files
  inside their model folder.
- file names (what a workflow can send): ``resolve_in_folders`` returns a path whose
  real location is inside a model folder, or raises :class:`WeightError`.

The symbolic-link rule (safe_load.check_inside): a model folder may itself be a link,
or lie in a linked folder (a models folder on another disk); a link INSIDE a model
folder is followed only when its real target is inside one of the node's model
folders. Tested below for the loader and for every node that opens files. Face-analysis
packs: the insightface folder and a pack folder may be links (a pack is the unit people
share); the pack's .onnx files and their external data must be inside the real pack folder.

Bounded for CI: :data:`EXAMPLES` examples per target (a few seconds in all),
derandomized (the same examples every run, no example database). A longer run:
``IDENTITY_ATTENTION_FUZZ_EXAMPLES=5000 pytest tests/test_hostile_files.py``;
``IDENTITY_ATTENTION_FUZZ_SEED=<int>`` explores other examples (random, seeded).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

import weight_fixtures as wf
from conftest import pack

safe_load = pack("adapters.weights.safe_load")
weight_errors = pack("adapters.weights.weight_errors")
formats = pack("adapters.formats.weight_formats")
native = pack("adapters.formats.native_format")
manifest_mod = pack("adapters.weights.weights_manifest")
face_analysis = pack("adapters.faces.face_analysis")
id_adapter = pack("adapters.projectors.id_adapter")
projectors = pack("adapters.projectors.projectors")

WeightError = weight_errors.WeightError
EXAMPLES = int(os.environ.get("IDENTITY_ATTENTION_FUZZ_EXAMPLES", "60"))
FUZZ_SEED = os.environ.get("IDENTITY_ATTENTION_FUZZ_SEED")
SENTINEL = "fuzz_pwned.txt"
SCALE = 40  # layer channels of the seed files (projector widths stay the released ones)


def fuzz(examples: int = EXAMPLES):
    """Settings for every fuzz target: bounded, derandomized unless a seed is given, no database."""

    def wrap(fn):
        fn = settings(
            max_examples=examples,
            deadline=None,
            derandomize=FUZZ_SEED is None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(fn)
        return seed(int(FUZZ_SEED))(fn) if FUZZ_SEED is not None else fn

    return wrap


Layer = namedtuple("Layer", "key inner_dim context_dim")


def fake_layers(base: str):
    """The cross-attention layers a UNet of ``base`` at :data:`SCALE` would have (for check_against_model)."""
    return [Layer(key, hidden // SCALE, wf.CONTEXT[base]) for _, hidden, key in wf.diffusers_attention_blocks(base)]


def load_like_the_node(path: str, roots) -> object:
    """What 'Load identity adapter' does with a file, minus ComfyUI."""
    loaded = safe_load.read_weight_file(path, roots=roots)
    adapter = formats.convert(loaded.tensors, loaded.metadata, source=os.path.basename(path))
    formats.check_against_model(adapter, fake_layers(adapter.base if adapter.base in wf.CONTEXT else "sd15"))
    return adapter


# --- seeds: one valid state dict per format (real key names, small layers) --------------------------

_SEEDS = {}


def seeds() -> dict:
    if not _SEEDS:
        half = torch.float16
        for fmt in ("ip_adapter", "ip_adapter_plus", "ip_adapter_full_face", "faceid", "faceid_plus", "instantid"):
            _SEEDS[fmt] = wf.ip_family_state(fmt, "sd15", scale=SCALE, dtype=half)[0]
        _SEEDS["pulid"] = wf.pulid_state("v1", scale=SCALE, dtype=half)[0]
        _SEEDS["fact"] = wf.fact_state(scale=SCALE, dtype=half)[0]
        _SEEDS["pva"] = wf.flatten_nested(wf.pva_checkpoint(scale=SCALE, dtype=half)[0])
        adapter = formats.convert(_SEEDS["faceid"])
        tensors, header = native.to_tensors(adapter)
        _SEEDS["native"] = (tensors, header)
    return _SEEDS


def seed_state(name: str):
    value = seeds()[name]
    return (dict(value[0]), dict(value[1])) if name == "native" else (dict(value), {})


def small_native_file(path: Path) -> Path:
    """A valid native file small enough to mutate byte by byte (a tiny ImageProjection, two layers)."""
    proj = projectors.build_projector(
        "ImageProjection",
        {"embed_dim": 8, "num_tokens": 2, "token_dim": 768},
        {"proj.weight": torch.randn(2 * 768, 8), "proj.bias": torch.zeros(2 * 768), "norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)},
    )
    layers = {("input", 1, 0): {"to_k": torch.randn(4, 768), "to_v": torch.randn(4, 768)}, ("output", 3, 0): {"to_k": torch.randn(4, 768), "to_v": torch.randn(4, 768)}}
    adapter = id_adapter.IdAdapter(format="native", base="sd15", context_dim=768, projector=proj, layers=layers, metadata={"note": "fuzz seed"})
    native.write_native(adapter, str(path))
    return path


# --- strategies ------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool, torch.int8]
shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)


@st.composite
def small_tensors(draw):
    shape = draw(shapes)
    dtype = draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from(["zeros", "ones", "nan", "inf", "random"]))
    t = torch.zeros(shape) if fill == "zeros" else torch.ones(shape) if fill == "ones" else torch.full(shape, float(fill)) if fill in ("nan", "inf") else torch.randn(shape)
    return t.to(dtype) if dtype.is_floating_point else t.nan_to_num(0.0).to(dtype)


@st.composite
def mutated_state(draw):
    """A valid state dict of some format with 1-4 edits: keys dropped / renamed / added, shapes, dtypes, NaN, header fields."""
    name = draw(st.sampled_from(sorted(seeds())))
    tensors, header = seed_state(name)
    keys = sorted(tensors)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "rename", "reshape", "dtype", "add", "slice", "transpose", "nan", "header"]))
        key = draw(st.sampled_from(keys))
        if key not in tensors:
            continue
        if op == "drop":
            del tensors[key]
        elif op == "rename":
            new = draw(st.sampled_from([key.replace("1", "7", 1), key + ".extra", "x" + key, key.rsplit(".", 1)[0], key.replace(".", "_", 1), "state_dict." + key]))
            tensors[new] = tensors.pop(key)
        elif op == "reshape":
            tensors[key] = draw(small_tensors())
        elif op == "dtype":
            dtype = draw(st.sampled_from(DTYPES))
            tensors[key] = tensors[key].to(dtype) if dtype.is_floating_point else tensors[key].nan_to_num(0.0).to(dtype)
        elif op == "add":
            tensors[draw(st.sampled_from(keys)) .replace("weight", draw(st.sampled_from(["bias", "weight2", "latents", "scale"])))] = draw(small_tensors())
        elif op == "slice" and tensors[key].dim():
            tensors[key] = tensors[key][: draw(st.integers(0, max(0, tensors[key].shape[0] - 1)))]
        elif op == "transpose" and tensors[key].dim() == 2:
            tensors[key] = tensors[key].t().contiguous()
        elif op == "nan" and tensors[key].is_floating_point() and tensors[key].numel():
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] = float("nan")
        elif op == "header" and header:
            field = draw(st.sampled_from(sorted(header) + ["format", "projector", "config"]))
            header[field] = draw(st.one_of(st.text(max_size=30), st.sampled_from(["", "null", "{}", "[]", "1e999", "-1", '{"class": "ImageProjection"}', "sdxl", "0"])))
    return name, tensors, header


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20,
)


@st.composite
def projector_headers(draw):
    """Native headers whose projector field holds any class name and any settings (the untrusted part)."""
    config = draw(st.dictionaries(
        st.sampled_from(["embed_dim", "num_tokens", "token_dim", "depth", "heads", "dim", "num_queries", "embedding_dim", "output_dim", "ff_mult",
                         "input_kind", "num_layer", "in_dim", "out_dim", "id_dim", "bogus"]),
        st.one_of(st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.booleans(), st.none()),
        max_size=6,
    ))
    spec = {"class": draw(st.sampled_from(sorted(projectors.PROJECTORS) + ["", "os.system", "Nope"])), "config": config}
    header = {
        "format": "identity_attention", "version": "1", "base": draw(st.sampled_from(["sd15", "sdxl", "sd2", "sd3", ""])),
        "context_dim": draw(st.sampled_from(["768", "2048", "-1", "x", "1e400"])), "num_tokens": draw(st.sampled_from(["2", "0", "-3", "many"])),
        "token_dim": draw(st.sampled_from(["768", "0", ""])), "projector": draw(st.one_of(st.just(json.dumps(spec)), st.text(max_size=20))),
        "extras": draw(st.sampled_from(["{}", "[]", "null", "{", '{"a": 1}'])), "metadata": draw(st.sampled_from(["{}", "[1, 2]", "3", "{"])),
        "mechanism": draw(st.sampled_from(["decoupled", "", "joint"])),
    }
    return header


DANGEROUS = [
    ("builtins", "exec"), ("builtins", "eval"), ("os", "system"), ("posix", "system"), ("subprocess", "check_output"),
    ("builtins", "__import__"), ("builtins", "getattr"), ("torch.serialization", "load"), ("pathlib", "Path"), ("builtins", "open"),
]


def _global(module: str, name: str, proto: int) -> bytes:
    if proto >= 4:
        return b"\x8c" + bytes([len(module)]) + module.encode() + b"\x94" + b"\x8c" + bytes([len(name)]) + name.encode() + b"\x94\x93"
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _string(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def payload_call(module: str, name: str, sentinel: str, proto: int) -> bytes:
    """Pickle opcodes calling ``module.name(arg)`` where the call would create ``sentinel``."""
    arg = {
        "exec": f"open({sentinel!r}, 'w').write('pwned')",
        "eval": f"open({sentinel!r}, 'w').write('pwned')",
        "system": f"touch {sentinel}",
        "check_output": f"touch {sentinel}",
        "open": sentinel,
    }.get(name, sentinel)
    if name == "check_output":  # check_output(["touch", sentinel])
        return _global(module, name, proto) + b"(](" + _string("touch") + _string(sentinel) + b"etR"
    if name == "open":  # open(sentinel, 'w') creates the file
        return _global(module, name, proto) + b"(" + _string(arg) + _string("w") + b"tR"
    return _global(module, name, proto) + b"(" + _string(arg) + b"tR"


@st.composite
def hostile_pickles(draw, sentinel: str):
    """Pickle bytes (raw, or in a torch zip archive) whose data holds a call that would create ``sentinel``."""
    proto = draw(st.sampled_from([2, 4]))
    module, name = draw(st.sampled_from(DANGEROUS))
    call = payload_call(module, name, sentinel, proto)
    shape = draw(st.sampled_from(["bare", "in_dict", "in_list", "as_key", "build", "after_tensor_like"]))
    body = {
        "bare": call,
        "in_dict": b"}(" + _string("payload") + call + _string("w") + b"K\x01u",
        "in_list": b"](" + b"K\x01" + call + b"e",
        "as_key": b"}(" + call + _string("v") + b"u",
        "build": _global("collections", "OrderedDict", proto) + b")R" + b"}(" + _string("x") + call + b"ub",
        "after_tensor_like": b"}(" + _string("w") + b"K\x00" + _string("payload") + call + b"u",
    }[shape]
    data = b"\x80" + bytes([proto]) + body + b"."
    if draw(st.booleans()):  # torch's zip layout: <name>/data.pkl, <name>/version
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", data)
            z.writestr("archive/byteorder", "little")
            z.writestr("archive/version", "3\n")
        data = buf.getvalue()
    return data


# --- the loader ------------------------------------------------------------------------------------


def _only_weight_errors(fn, *args):
    try:
        return fn(*args)
    except WeightError:
        return None


def test_loader_survives_any_bytes(tmp_path):
    root = tmp_path / "ipadapter"
    root.mkdir()
    path = root / "fuzz.bin"
    prefixes = st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04", struct.pack("<Q", 40) + b"{", struct.pack("<Q", 2) + b"{}", b"\x80\x02}q\x00."])

    @fuzz()
    @given(prefixes, st.binary(max_size=2048))
    def run(prefix, data):
        path.write_bytes(prefix + data)
        _only_weight_errors(load_like_the_node, str(path), [str(root)])

    run()


def test_loader_survives_mutated_files(tmp_path):
    root = tmp_path / "ipadapter"
    root.mkdir()
    good = small_native_file(root / "seed.safetensors").read_bytes()
    buf = io.BytesIO()
    torch.save({"image_proj": {"proj.weight": torch.ones(4, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(3, 2)}}, buf)
    zip_seed = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf, _use_new_zipfile_serialization=False)
    legacy_seed = buf.getvalue()
    path = root / "fuzz.safetensors"

    @fuzz()
    @given(st.sampled_from([good, zip_seed, legacy_seed]), st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "splice_header"]), st.integers(0, 2**31), st.binary(min_size=1, max_size=16)), min_size=1, max_size=4))
    def run(data, edits):
        data = bytearray(data)
        for op, at, blob in edits:
            at %= max(len(data), 1)
            if op == "flip" and data:
                data[at] ^= blob[0] or 1
            elif op == "cut":
                del data[at:]
            elif op == "insert":
                data[at:at] = blob
            elif op == "splice_header" and len(data) > 8:
                data[8 + at % 64 : 8 + at % 64 + len(blob)] = blob
        path.write_bytes(bytes(data))
        _only_weight_errors(load_like_the_node, str(path), [str(root)])

    run()


def test_safetensors_headers_of_any_shape(tmp_path):
    """Valid safetensors framing around any JSON header: dtypes, shapes, offsets, metadata of every kind."""
    root = tmp_path / "ipadapter"
    root.mkdir()
    path = root / "fuzz.safetensors"
    entry = st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F64", "F8_E4M3", "XX", ""]),
        "shape": st.lists(st.integers(-2, 2**40), max_size=4),
        "data_offsets": st.lists(st.integers(-1, 2**40), min_size=0, max_size=3),
    })

    @fuzz()
    @given(
        st.dictionaries(st.sampled_from(["ip_adapter.1.to_k_ip.weight", "image_proj.proj.weight", "layers.input.1.0.to_k", "__metadata__", "x"]), st.one_of(entry, json_values), max_size=4),
        st.binary(max_size=256),
    )
    def run(header, data):
        text = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)
        _only_weight_errors(load_like_the_node, str(path), [str(root)])

    run()


def test_converter_survives_mutated_state_dicts():
    @fuzz(EXAMPLES * 2)
    @given(mutated_state())
    def run(case):
        _, tensors, header = case
        adapter = _only_weight_errors(formats.convert, tensors, header, "fuzz")
        if adapter is not None:
            _only_weight_errors(formats.check_against_model, adapter, fake_layers(adapter.base if adapter.base in wf.CONTEXT else "sd15"))

    run()


def test_seed_state_dicts_convert():
    """The seeds are valid (so the mutations start from files that load)."""
    for name in seeds():
        tensors, header = seed_state(name)
        adapter = formats.convert(tensors, header)
        formats.check_against_model(adapter, fake_layers(adapter.base))


def test_native_headers_of_any_content():
    tensors = {"layers.input.1.0.to_k": torch.zeros(4, 768), "projector.proj.weight": torch.zeros(1536, 8)}

    @fuzz()
    @given(projector_headers())
    def run(header):
        _only_weight_errors(native.from_tensors, tensors, header)

    run()


def test_projector_settings_are_bounded():
    """A header may not make the loader build a huge module (a 10**7-layer resampler would take minutes)."""
    with pytest.raises(WeightError, match="out of range"):
        projectors.build_projector("PerceiverResampler", {"depth": 10**7, "dim": 8, "heads": 1, "num_queries": 1, "embedding_dim": 8, "output_dim": 8}, {})
    with pytest.raises(WeightError, match="out of range"):
        projectors.build_projector("ImageProjection", {"embed_dim": -4, "num_tokens": 2, "token_dim": 8}, {})


def test_pickles_that_would_run_code_never_run(tmp_path):
    root = tmp_path / "ipadapter"
    root.mkdir()
    sentinel = tmp_path / SENTINEL
    path = root / "fuzz.bin"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a relative sentinel too: 'touch fuzz_pwned.txt' would land here
    try:

        @fuzz()
        @given(hostile_pickles(str(sentinel)))
        def run(data):
            path.write_bytes(data)
            with pytest.raises(WeightError):
                load_like_the_node(str(path), [str(root)])
            assert not sentinel.exists(), "a pickle ran code while loading"

        run()
    finally:
        os.chdir(cwd)


def test_the_fuzzers_payloads_are_live(tmp_path):
    """Proof the payloads are real: a plain unpickler (in a throwaway process) runs them."""
    for proto in (2, 4):
        for module, name in (("builtins", "exec"), ("os", "system"), ("builtins", "open")):
            sentinel = tmp_path / f"live_{proto}_{name}.txt"
            data = b"\x80" + bytes([proto]) + payload_call(module, name, str(sentinel), proto) + b"."
            blob = tmp_path / "live.pkl"
            blob.write_bytes(data)
            subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())", str(blob)],
                           cwd=str(tmp_path), capture_output=True, timeout=120)
            assert sentinel.exists(), f"{module}.{name} (protocol {proto}) did not run under plain pickle"
            with pytest.raises(weight_errors.UnsafeFileError):
                safe_load.read_weight_file(str(blob))


def test_zip_bomb_is_refused_before_unpacking(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}." + b"\x00" * (64 * 2**20))  # 64 MB of zeros in a ~64 KB file
    assert path.stat().st_size < 2**20
    with pytest.raises(WeightError, match="would unpack to"):
        safe_load.read_weight_file(str(path))


# --- the manifest ------------------------------------------------------------------------------------

ENTRY_KEYS = manifest_mod.REQUIRED + manifest_mod.OPTIONAL
path_parts = st.sampled_from(["a", "b.safetensors", ".", "..", "", "C:", "~", "\\", "..\\x", "x:y", "%2e%2e", "\x00", " ", "models", "/"])


@st.composite
def entries(draw):
    real = manifest_mod.load_manifest().entries
    entry = dict(draw(st.sampled_from(real)))
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(ENTRY_KEYS + ("unknown",)))
        if draw(st.booleans()):
            entry.pop(key, None)
        else:
            entry[key] = draw(json_values)
    if draw(st.booleans()):
        entry["file"] = "/".join(draw(st.lists(path_parts, min_size=1, max_size=4)))
    if draw(st.booleans()):
        entry["file"] = draw(st.text(max_size=20))
    return entry


def test_manifest_validator_never_raises_and_accepts_only_safe_paths(tmp_path):
    @fuzz(EXAMPLES * 2)
    @given(st.one_of(json_values, st.fixed_dictionaries({"schema": st.sampled_from([manifest_mod.SCHEMA, "x"]), "entries": st.lists(entries(), min_size=1, max_size=3)})))
    def run(data):
        problems = manifest_mod.validate_manifest(data)
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
        try:
            m = manifest_mod.Manifest(data)
        except ValueError:
            assert problems
            return
        assert not problems
        for e in m.entries:  # where the download command would write
            folder = tmp_path / "models" / e["folder"]
            dest = os.path.join(str(folder), *e["file"].split("/"))
            assert safe_load.is_inside(dest, str(folder)), f"{e['file']!r} leaves {folder}"

    run()


@pytest.mark.parametrize("file", [".", "a/./b.bin", "../x.bin", "a/../../x.bin", "/etc/passwd", "C:/x.bin", "a\\..\\x.bin", "a//b.bin", "a\x00.bin", ""])
def test_manifest_refuses_file_names_that_are_not_plain_paths(file):
    entry = dict(manifest_mod.load_manifest().entries[0], file=file)
    assert any("file" in p for p in manifest_mod.validate_entry(entry))


def test_manifest_files_of_any_bytes(tmp_path):
    text = Path(manifest_mod.DEFAULT_PATH).read_bytes()
    path = tmp_path / "weights_manifest.json"

    @fuzz()
    @given(st.one_of(st.binary(max_size=512), st.tuples(st.integers(0, len(text)), st.integers(0, 200), st.binary(max_size=8)).map(
        lambda cut: text[: cut[0]] + cut[2] + text[cut[0] + cut[1]:])))
    def run(data):
        path.write_bytes(data)
        manifest_mod._CACHE.clear()
        try:
            manifest_mod.load_manifest(str(path))
        except (OSError, ValueError):
            pass

    run()


def test_deeply_nested_manifest_is_a_value_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError):
        manifest_mod.load_manifest(str(path))


# --- names and links ----------------------------------------------------------------------------------


@pytest.fixture()
def linked_tree(tmp_path):
    """models/ipadapter with files, sub-folders and links in and out; a secret file outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.safetensors"
    save_file({"x": torch.zeros(1)}, str(secret))
    other_disk = tmp_path / "disk2" / "ipadapter"
    other_disk.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(other_disk / "on_disk2.safetensors"))
    root = tmp_path / "models" / "ipadapter"
    (root / "sub").mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(root / "ok.safetensors"))
    save_file({"x": torch.zeros(1)}, str(root / "sub" / "nested.safetensors"))
    os.symlink(secret, root / "link_out.safetensors")
    os.symlink(outside, root / "dir_out")
    os.symlink(root / "sub" / "nested.safetensors", root / "link_in.safetensors")
    os.symlink(root / "sub", root / "dir_in")
    os.symlink("/", root / "fs_root")
    os.symlink(other_disk / "on_disk2.safetensors", root / "link_to_other_root.safetensors")
    return {"root": root, "secret": secret, "other_root": other_disk, "tmp": tmp_path}


def test_names_never_leave_the_model_folders(linked_tree):
    root, other = linked_tree["root"], linked_tree["other_root"]
    roots = [str(root), str(other)]
    parts = st.sampled_from(["ok.safetensors", "sub", "nested.safetensors", "..", ".", "", "link_out.safetensors", "dir_out", "secret.safetensors",
                             "link_in.safetensors", "dir_in", "fs_root", "etc", "passwd", "outside", "C:", "\\..\\", "/", "\x00", "link_to_other_root.safetensors",
                             str(linked_tree["secret"]), "~"])

    @fuzz(EXAMPLES * 2)
    @given(st.lists(parts, min_size=1, max_size=5).map("/".join) | st.text(max_size=30))
    def run(name):
        try:
            path = safe_load.resolve_in_folders(name, roots)
        except WeightError:
            return
        real = os.path.realpath(path)
        assert any(safe_load.is_inside(real, os.path.realpath(r)) for r in roots), f"{name!r} -> {real}"

    run()


def test_symlink_rule(linked_tree):
    root = linked_tree["root"]
    roots = [str(root)]
    assert safe_load.resolve_in_folders("ok.safetensors", roots)
    assert safe_load.resolve_in_folders("link_in.safetensors", roots)  # a link to a file inside the folder
    assert safe_load.resolve_in_folders("dir_in/nested.safetensors", roots)  # a linked sub-folder inside it
    for name in ("link_out.safetensors", "dir_out/secret.safetensors", f"fs_root{linked_tree['secret']}", "link_to_other_root.safetensors"):
        with pytest.raises(WeightError, match="symbolic link") as err:
            safe_load.resolve_in_folders(name, roots)
        assert "Fix:" in str(err.value) and "extra_model_paths.yaml" in str(err.value)
    # ... but a link to a file in another registered folder of the same kind is fine
    assert safe_load.resolve_in_folders("link_to_other_root.safetensors", roots + [str(linked_tree["other_root"])])
    with pytest.raises(WeightError, match="symbolic link"):
        safe_load.read_weight_file(str(root / "link_out.safetensors"), roots=roots)


def test_a_models_folder_on_another_disk_works(linked_tree):
    """The folder itself may be a link (models/ipadapter -> /mnt/disk2/ipadapter), or live in a linked models folder."""
    tmp = linked_tree["tmp"]
    linked_root = tmp / "comfy" / "models" / "ipadapter"
    linked_root.parent.mkdir(parents=True)
    os.symlink(linked_tree["other_root"], linked_root)
    assert safe_load.read_weight_file(safe_load.resolve_in_folders("on_disk2.safetensors", [str(linked_root)]), roots=[str(linked_root)])
    linked_models = tmp / "comfy2" / "models"
    linked_models.parent.mkdir()
    os.symlink(linked_tree["root"].parent, linked_models)
    root = str(linked_models / "ipadapter")
    assert safe_load.read_weight_file(safe_load.resolve_in_folders("sub/nested.safetensors", [root]), roots=[root])
    with pytest.raises(WeightError, match="symbolic link"):
        safe_load.resolve_in_folders("link_out.safetensors", [root])


def test_face_packs_follow_the_same_rules(tmp_path):
    root = tmp_path / "insightface"
    (root / "models" / "good").mkdir(parents=True)
    (root / "models" / "good" / "det.onnx").write_bytes(b"x")
    outside = tmp_path / "elsewhere" / "evil"
    outside.mkdir(parents=True)
    (outside / "det.onnx").write_bytes(b"x")
    os.symlink(outside, root / "models" / "linked_out")
    (root / "models" / "file_link").mkdir()
    os.symlink(outside / "det.onnx", root / "models" / "file_link" / "det.onnx")
    assert face_analysis.find_face_pack("good", [root]).name == "good"
    assert face_analysis.find_face_pack("linked_out", [root]).name == "linked_out"  # a whole pack folder linked in
    for name in ("../../elsewhere/evil", "/etc", "..", "a\\b", "file_link", "C:x"):
        with pytest.raises(face_analysis.FaceAnalysisError) as err:
            face_analysis.find_face_pack(name, [root])
        assert err.value.input_name == "pack"
    linked_root = tmp_path / "linked_insightface"
    os.symlink(root, linked_root)  # the whole insightface folder on another disk
    assert face_analysis.find_face_pack("good", [linked_root]).name == "good"


# --- the nodes that open files apply the same rules -----------------------------------------------------


@pytest.fixture()
def node_folders(tmp_path, monkeypatch):
    """The pack's model folders pointed at a fresh tree with a link out of it (in-process host)."""
    import folder_paths

    weights_nodes = pack("nodes.identity.weights_nodes")
    outside = tmp_path / "outside"
    outside.mkdir()
    folders = {}
    for name in weights_nodes.ADAPTER_FOLDERS:
        path = tmp_path / "models" / name
        path.mkdir(parents=True)
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(path)], {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}))
        folders[name] = path
    monkeypatch.setattr(folder_paths, "filename_list_cache", {}, raising=False)
    weights_nodes._ADAPTERS.clear()
    return folders, outside


def _node_error(fn, *args):
    errors = pack("nodes.common.errors")
    with pytest.raises(errors.IdentityAttentionError) as err:
        fn(*args)
    return str(err.value)


def test_load_identity_adapter_refuses_links_out_of_the_folders(node_folders, tiny):
    folders, outside = node_folders
    weights_nodes = pack("nodes.identity.weights_nodes")
    state, _ = wf.ip_family_state("faceid", "sd15", seed=1)
    save_file(state, str(outside / "faceid.safetensors"))
    os.symlink(outside / "faceid.safetensors", folders["ipadapter"] / "faceid_link.safetensors")
    message = _node_error(weights_nodes.LoadIdentityAdapter().load, "ipadapter/faceid_link.safetensors", tiny.unet("sd15"))
    assert message.startswith("Load identity adapter: input 'adapter':") and "symbolic link" in message and "Fix:" in message
    save_file(state, str(folders["ipadapter"] / "faceid.safetensors"))  # the same file inside the folder loads
    adapter, _ = weights_nodes.LoadIdentityAdapter().load("ipadapter/faceid.safetensors", tiny.unet("sd15"))
    assert adapter.format == "faceid"
    for name in ("ipadapter/../outside/faceid.safetensors", f"ipadapter/{outside}/faceid.safetensors", "ipadapter/\x00"):
        assert "outside the model folders" in _node_error(weights_nodes.LoadIdentityAdapter().load, name, tiny.unet("sd15"))


def test_face_encoder_and_identity_tokens_refuse_links_out(node_folders):
    folders, outside = node_folders
    face_encoder_nodes = pack("nodes.identity.face_encoder_nodes")
    stage_token_nodes = pack("nodes.stage_tokens.stage_token_nodes")
    from test_transface_encoder import transface_state_dict

    torch.save(transface_state_dict(depth=1, heads=False), outside / "transface.pt")
    os.symlink(outside / "transface.pt", folders["identity_attention"] / "transface.pt")
    message = _node_error(face_encoder_nodes.LoadFaceEncoder().load, "transface.pt")
    assert message.startswith("Load face encoder (TransFace): input 'encoder_name':") and "symbolic link" in message
    tensors, metadata = pack("adapters.attention.stage_tokens").make_tokens("sd15").to_file_dict()
    save_file(tensors, str(outside / "tokens.safetensors"), metadata=metadata)
    os.symlink(outside / "tokens.safetensors", folders["identity_attention"] / "tokens.safetensors")
    message = _node_error(stage_token_nodes.LoadIdentityTokens().load, "tokens.safetensors")
    assert message.startswith("Load identity tokens: input 'tokens_name':") and "symbolic link" in message
    os.replace(outside / "tokens.safetensors", folders["identity_attention"] / "real_tokens.safetensors")
    assert stage_token_nodes.LoadIdentityTokens().load("real_tokens.safetensors")[0].stages == 5
    assert "outside the model folders" in _node_error(stage_token_nodes.LoadIdentityTokens().load, "../outside/x.safetensors")


def _onnx_with_external_data(path: Path, location: str) -> Path:
    from onnx import TensorProto, helper

    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[tensor],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_onnx_files_that_read_data_from_outside_their_folder_are_refused(tmp_path):
    """ONNX files are models, not code, but their 'external data' may name any file: refused before loading."""
    import toy_faces as toy

    (tmp_path / "secret.bin").write_bytes(b"0123456789abcdef")
    pack_dir = toy.copy_pack(toy.toy_pack(), tmp_path / "insightface" / "models" / "toypack")
    for location in ("../../../secret.bin", str(tmp_path / "secret.bin")):
        evil = _onnx_with_external_data(pack_dir / "a_evil.onnx", location)
        assert "outside the pack folder" in face_analysis.external_data_problem(evil)
        with pytest.raises(face_analysis.FaceAnalysisError, match="a_evil.onnx in the face analysis pack was refused") as err:
            face_analysis.load_face_analysis(pack_dir, "CPU")
        assert err.value.input_name == "pack" and err.value.fix
    (pack_dir / "inside.bin").write_bytes(b"0123456789abcdef")
    assert face_analysis.external_data_problem(_onnx_with_external_data(pack_dir / "a_evil.onnx", "inside.bin")) is None
