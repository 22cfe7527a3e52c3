"""Reading weight files without running code from them.

- The file's CONTENT decides how it is read, not its name: safetensors (an
  8-byte header length, then JSON) through ``safetensors``; PyTorch files
  (zip archives or legacy pickles) ONLY through
  ``torch.load(weights_only=True)``, whose unpickler accepts tensors and plain
  containers and rejects everything else. A file it rejects is refused with
  :class:`UnsafeFileError`; there is no fallback to full unpickling.
- Size sanity: empty files, files too short to hold a header, files over
  :data:`MAX_BYTES`, and (with ``expected_bytes``) files smaller than the
  released file (an interrupted download) are refused before reading.
- Declared sizes: a zip PyTorch file may not unpack to more than :data:`MAX_INFLATION`
  times its size; a legacy (pre-1.6) one may not declare storages larger than the tensor
  data it holds (:mod:`.legacy_torch_sizes`, read before ``torch.load`` allocates them);
  tensors that repeat stored values (stride 0) may not expand past the file's size
  (:func:`check_tensor_views`).
- Paths: :func:`resolve_in_folders` turns a file name from a node's list into
  a path and refuses names that leave the registered model folders
  (absolute paths, drive letters, ``..``, NUL bytes); :func:`check_inside`
  does the same for full paths. The symbolic-link rule (see
  :func:`check_inside`): a registered model folder may itself be a link (or
  live under one) to another disk; a link INSIDE it is followed only when its
  target is inside one of the registered folders too, so a link planted in a
  models folder cannot make a node read ``~/.ssh`` or ``/etc``.
- :func:`sha256_file` hashes in chunks and reports progress to a callback
  (``nodes/`` passes a ComfyUI progress bar).

Nested dicts (IP-Adapter ``.bin`` = ``{"image_proj": {...}, "ip_adapter": {...}}``,
PVA's ``{"unet": {...}, "transform_network": {...}}``) are flattened to dotted
keys, the same keys the ``.safetensors`` versions of those files use.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .legacy_torch_sizes import legacy_storage_problem
from .weight_errors import UnsafeFileError, WeightError

MAX_BYTES = 8 * 1024**3  # the largest identity adapter known is 1.7 GB (InstantID); CLIP-vision bigG is 3.7 GB
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit
WRAPPER_PREFIXES = ("state_dict.", "module.")
MAX_INFLATION = 4  # a zip PyTorch file unpacks to about its own size (records are stored, not compressed)



@dataclass
class WeightFile:
    """What :func:`read_weight_file` returns. Tensors stay on the CPU in their stored dtype."""

    path: str
    kind: str  # "safetensors" or "pytorch"
    size: int
    tensors: Dict[str, torch.Tensor]
    metadata: Dict[str, str] = field(default_factory=dict)
    ignored: List[str] = field(default_factory=list)  # non-tensor entries of a PyTorch file (names)


def _name(path: str) -> str:
    return os.path.basename(path)


def sniff(path: str) -> str:
    """"safetensors" or "pytorch" from the first bytes; :class:`WeightError` otherwise."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise WeightError(f"'{_name(path)}' is only {len(head)} bytes long: it is not a weight file (or the download was cut short)", fix="download the file again")
    header_len = int.from_bytes(head[:8], "little")
    if 2 <= header_len <= MAX_HEADER_BYTES and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pytorch"
    raise WeightError(
        f"'{_name(path)}' is neither a safetensors file nor a PyTorch checkpoint (its first bytes match neither format)",
        fix="check that the file finished downloading and is a weight file",
    )


def path_is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def check_size(path: str, expected_bytes: Optional[int] = None, max_bytes: int = MAX_BYTES) -> int:
    if not os.path.isfile(path):
        raise WeightError(f"the file '{path}' does not exist", fix="pick a file from the list, or put the file in one of the model folders")
    size = os.path.getsize(path)
    if size == 0:
        raise WeightError(f"'{_name(path)}' is empty (0 bytes)", fix="download the file again")
    if size > max_bytes:
        raise WeightError(f"'{_name(path)}' is {size / 1024**3:.1f} GB, larger than any identity adapter ({max_bytes / 1024**3:.0f} GB limit)", fix="pick the adapter file, not a full model checkpoint")
    if expected_bytes is not None and size < expected_bytes:
        raise WeightError(
            f"'{_name(path)}' is {size:,} bytes but the released file is {expected_bytes:,} bytes: the download is incomplete",
            fix="download it again (the pack's download command resumes and checks it)",
        )
    return size


MAX_NESTING = 16  # released checkpoints nest dicts 1-3 deep (a trainer checkpoint with optimizer state: 5)
MAX_ENTRIES = 1_000_000  # SDXL's whole UNet has ~2,500 tensors; a trainer checkpoint with Adam state ~3x its modules


def _bomb(what: str) -> WeightError:
    return WeightError(
        f"the file's containers {what}: it is not a weight file (a few kilobytes built like this can expand to billions of "
        "entries when read, a memory bomb), so it was refused",
        fix="use the .safetensors version of this file, or a copy from the original publisher",
    )


def check_object_bounds(obj, max_depth: Optional[int] = None, max_entries: Optional[int] = None) -> int:
    """Walk a loaded object once (each container by ``id``, iteratively) and refuse bombs; returns the entry count.

    Containers (dict, list, tuple, set) that several places share are counted ONCE,
    so the walk costs at most the number of distinct objects the unpickler built
    (bounded by the file's size), never the number of paths through them. Refused
    with :class:`WeightError`: nesting deeper than ``max_depth``, more than
    ``max_entries`` entries in all.
    """
    max_depth = MAX_NESTING if max_depth is None else max_depth
    max_entries = MAX_ENTRIES if max_entries is None else max_entries
    seen = set()
    entries = 0
    stack = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list, tuple, set, frozenset)):
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if depth > max_depth:
            raise _bomb(f"are nested more than {max_depth} deep")
        entries += len(item)
        if entries > max_entries:
            raise _bomb(f"hold more than {max_entries:,} entries")
        values = item.values() if isinstance(item, dict) else item
        if isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item.keys() if isinstance(k, (tuple, frozenset)))
        stack.extend((v, depth + 1) for v in values)
    return entries


def flatten(obj, prefix: str = "", tensors: Optional[Dict[str, torch.Tensor]] = None, ignored: Optional[List[str]] = None, depth: int = 0):
    """Nested dicts -> ``{"a.b.c": tensor}``; non-tensor leaves are listed in ``ignored``.

    Bounded (see :func:`check_object_bounds`, which runs first): each dict is
    expanded once; a dict reached again through another key is not expanded again
    but listed in ``ignored`` as ``"<key> (same as <first key>)"``.
    """
    check_object_bounds(obj)
    tensors = {} if tensors is None else tensors
    ignored = [] if ignored is None else ignored
    first: Dict[int, str] = {}
    stack = [(obj, prefix, depth)]
    while stack:
        item, pre, level = stack.pop()
        name = pre.rstrip(".") or "<root>"
        if isinstance(item, torch.Tensor):
            tensors[pre.rstrip(".")] = item
        elif isinstance(item, dict):
            if id(item) in first:
                ignored.append(f"{name} (same as {first[id(item)]})")
                continue
            if level > MAX_NESTING:
                raise _bomb(f"are nested more than {MAX_NESTING} deep")
            first[id(item)] = name
            stack.extend((value, f"{pre}{key}.", level + 1) for key, value in reversed(list(item.items())))
        else:
            ignored.append(name)
    return tensors, ignored


def strip_wrappers(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove a ``state_dict.`` / ``module.`` prefix that EVERY key has (training wrappers)."""
    changed = True
    while changed and tensors:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
                changed = True
    return tensors


def _read_safetensors(path: str):
    from safetensors import SafetensorError, safe_open

    try:
        tensors = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, KeyError, OverflowError, MemoryError) as err:
        raise WeightError(
            f"'{_name(path)}' is a damaged safetensors file ({err})",
            fix="download the file again; with the pack's download command the result is checked against the published sha256",
        ) from None
    return tensors, metadata


def _check_archive(path: str, size: int) -> None:
    """A zip-format PyTorch file must not unpack to more than :data:`MAX_BYTES` (torch.save stores
    records uncompressed; a small file that inflates to gigabytes is a memory bomb, not weights)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, struct.error, OverflowError) as err:
        raise WeightError(f"'{_name(path)}' is a damaged PyTorch file ({err})", fix="download the file again") from None
    unpacked = sum(m.file_size for m in members)
    if unpacked > MAX_BYTES or unpacked > MAX_INFLATION * max(size, 1):
        raise WeightError(
            f"'{_name(path)}' would unpack to {unpacked / 1024**3:.1f} GB from {size / 1024**2:.1f} MB: it is not a weight file",
            fix="use the .safetensors version of this file, or a copy from the original publisher",
        )


def _torch_load(path: str):
    """``torch.load(weights_only=True)`` of a file already size-checked; the result is bounds-checked."""
    size = os.path.getsize(path)
    if path_is_zip(path):
        _check_archive(path, size)
    else:
        problem = legacy_storage_problem(path, size)
        if problem:
            raise WeightError(f"'{_name(path)}' was refused: {problem}", fix="use the .safetensors version of this file, or a copy from the original publisher")
    try:
        # an open file, not the path: torch.load would route a path ending in .safetensors by its name
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights_only" in text or "Unsupported" in text or "global" in text.lower():
            raise UnsafeFileError(
                f"'{_name(path)}' contains Python objects besides tensors, and loading it could run code from the file; "
                "it was not loaded (only torch.load(weights_only=True) is used)",
                fix="use the .safetensors version of this file, or a copy from the original publisher",
            ) from None
        raise WeightError(f"'{_name(path)}' is a damaged PyTorch file ({text.splitlines()[0] if text else 'unpickling failed'})", fix="download the file again") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, struct.error, OverflowError,
            ZeroDivisionError, AssertionError, RecursionError, MemoryError, NotImplementedError, zipfile.BadZipFile) as err:
        raise WeightError(f"'{_name(path)}' is a damaged PyTorch file ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})", fix="download the file again") from None
    try:
        check_object_bounds(obj)
        check_tensor_views(obj, size)
    except WeightError as err:
        raise WeightError(f"'{_name(path)}': {err.problem}", fix=err.fix) from None
    return obj


MAX_VIEW_SLACK = 16 * 1024**2  # bytes of expanded views allowed beyond the file's size (e.g. position_ids.expand)


def check_tensor_views(obj, file_size: int) -> int:
    """Refuse tensors whose elements, once copied, would take far more memory than the file.

    A pickled tensor is (storage, offset, size, stride): a one-element storage with
    stride 0 and size 100000 x 100000 is a valid tensor of 10^10 elements that costs
    nothing until the first ``.to()``, ``.abs()`` or matmul copies it. The sum of every
    distinct tensor's ``numel * element_size`` may exceed the file's size by at most
    :data:`MAX_VIEW_SLACK` (times :data:`MAX_INFLATION`). Returns that sum.
    """
    limit = MAX_INFLATION * max(file_size, 1) + MAX_VIEW_SLACK
    total, seen = 0, set()
    stack = [obj]
    while stack:  # containers were bounded by check_object_bounds; each visited once here too
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
            if total > limit:
                raise _bomb(f"hold tensors that expand to more than {limit / 1024**2:,.0f} MB from a {file_size / 1024**2:,.1f} MB file "
                            f"(the tensor of shape {list(item.shape)} repeats its stored values)")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return total


def _read_pytorch(path: str):
    return flatten(_torch_load(path))


def load_pytorch_object(path: str, roots: Optional[Sequence[str]] = None, expected_bytes: Optional[int] = None):
    """A PyTorch file's object (dicts, lists, tensors...) for callers that need more than tensors
    (a trainer checkpoint's step and optimizer state). The same checks as :func:`read_weight_file`:
    content sniffed (a safetensors file is refused here), sizes, zip inflation, ``weights_only``,
    and :func:`check_object_bounds` (depth, entries, shared containers counted once)."""
    if roots is not None:
        check_inside(path, roots)
    check_size(path, expected_bytes)
    if sniff(path) != "pytorch":
        raise WeightError(f"'{_name(path)}' is a safetensors file, not a PyTorch checkpoint", fix="pick the checkpoint file (.pt)")
    return _torch_load(path)


def read_weight_file(path: str, roots: Optional[Sequence[str]] = None, expected_bytes: Optional[int] = None) -> WeightFile:
    """Read a weight file safely (see module docstring). ``roots``: folders the path must be inside."""
    if roots is not None:
        check_inside(path, roots)
    size = check_size(path, expected_bytes)
    kind = sniff(path)
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(path)
        ignored: List[str] = []
    else:
        tensors, ignored = _read_pytorch(path)
        metadata = {}
    if not tensors:
        raise WeightError(f"'{_name(path)}' holds no tensors", fix="pick a weight file")
    return WeightFile(path=path, kind=kind, size=size, tensors=strip_wrappers(tensors), metadata=metadata, ignored=ignored)


# --- ONNX files (face analysis packs) --------------------------------------------------------------

MAX_ONNX_BYTES = 2 * 1024**3  # protobuf's own limit; antelopev2's largest file (glintr100.onnx) is 249 MB
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 21: 2, 25: 2}  # ModelProto field -> wire type


def onnx_file_problem(path: str, max_bytes: int = MAX_ONNX_BYTES) -> Optional[str]:
    """Why ``path`` cannot be an ONNX model, judged by size and first bytes (not the name); None if it can be.

    An ONNX file is a protobuf ``ModelProto``: its first byte(s) are the tag of one of
    ModelProto's fields. A safetensors file, zip, pickle or text renamed ``.onnx`` fails
    this before onnxruntime parses it; files over :data:`MAX_ONNX_BYTES` are refused
    before they are read into memory.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    if size == 0:
        return "it is empty (0 bytes)"
    if size > max_bytes:
        return f"it is {size / 1024**3:.1f} GB, over the {max_bytes / 1024**3:.0f} GB an ONNX file can hold"
    tag = head[0] & 0x7F
    if head[0] & 0x80 and len(head) > 1:
        tag |= (head[1] & 0x7F) << 7
    if _ONNX_FIELDS.get(tag >> 3) != tag & 7:
        return "its content is not an ONNX model (only the name ends in .onnx)"
    return None


# --- paths ----------------------------------------------------------------------------------------


def _norm(path: str) -> str:
    return os.path.normcase(os.path.normpath(os.path.abspath(path)))


def is_inside(path: str, root: str) -> bool:
    path, root = _norm(path), _norm(root)
    return path != root and path.startswith(root.rstrip(os.sep) + os.sep)


def check_inside(path: str, roots: Iterable[str]) -> None:
    """``path`` must be inside one of ``roots``, by name AND after following links.

    The symbolic-link rule: each root is taken as it really is (``realpath``), so
    ``models/ipadapter -> /mnt/disk2/ipadapter`` (or a whole ``models`` folder on
    another disk) works; the file's own real location must then be inside the real
    location of one of the roots. A link inside a models folder whose target is
    outside every root (``models/ipadapter/x.safetensors -> /home/me/.ssh/id_rsa``,
    or a linked subfolder pointing at ``/``) is refused.
    """
    roots = list(roots)
    if not any(is_inside(path, root) for root in roots):
        raise WeightError(
            f"'{path}' is outside the model folders this node reads ({', '.join(roots) or 'none registered'})",
            fix="put the file in one of those folders and pick it from the list",
        )
    real = os.path.realpath(path)
    if not any(is_inside(real, os.path.realpath(root)) for root in roots):
        raise WeightError(
            f"'{_name(path)}' is a symbolic link (or lies in a linked folder) whose target {real} is outside the model folders "
            f"({', '.join(roots)}); links that leave the model folders are not followed",
            fix="link the whole model folder instead (e.g. models/ipadapter -> /mnt/disk/ipadapter), move the file into the folder, "
            "or add the folder that holds it to extra_model_paths.yaml",
        )


def safe_relative_name(name: str) -> str:
    """Refuse names that could leave a folder: absolute, drive-qualified, ``..`` parts, NUL bytes."""
    parts = name.replace("\\", "/").split("/")
    if not name or "\x00" in name or os.path.isabs(name) or name.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts:
        raise WeightError(f"the file name '{name}' points outside the model folders", fix="pick a file from the list")
    return name


def resolve_in_folders(name: str, roots: Sequence[str]) -> str:
    """The full path of ``name`` inside the first of ``roots`` that has it."""
    safe_relative_name(name)
    for root in roots:
        candidate = os.path.join(root, name)
        if is_inside(candidate, root) and os.path.isfile(candidate):
            check_inside(candidate, roots)
            return candidate
    raise WeightError(f"'{name}' was not found in {', '.join(roots) or 'any model folder'}", fix="put the file there, or pick another file from the list")


# --- hashing (shared with the CLI, which must not import torch) ----------------------------------

from .file_hash import sha256_file  # noqa: E402,F401
