"""The storage sizes a legacy (pre-1.6, non-zip) PyTorch file declares, read without building anything.

A legacy file is five pickles in a row (magic number, protocol version, system info,
the object, the list of storage keys), then each storage's bytes. The object pickle
names every storage as a persistent id ``("storage", <dtype>Storage, key, location,
numel, view)``, and ``torch.load`` allocates ``numel`` elements for it the moment
it meets the id, before a byte of data is read: a 300-byte file can ask for
terabytes. :func:`legacy_storage_problem` reads the ids first, with an unpickler whose
``find_class`` imports nothing (every global becomes an inert :class:`_Inert` class
that records its name) and whose ``persistent_load`` only records, and compares the
declared total with the bytes the file really has after the pickles.

Memory of this scan: the unpickler builds at most one small object per opcode, so it
is bounded by the file's size (the caller has already capped that).
"""

from __future__ import annotations

import pickle
from typing import BinaryIO, Dict, Optional

ELEMENT_BYTES = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "QInt8Storage": 1, "QUInt8Storage": 1,
    "QInt32Storage": 4, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1, "UntypedStorage": 1,
}
UNKNOWN_ELEMENT_BYTES = 16  # the widest element (complex128): an unknown type is never under-counted
MAX_STORAGES = 1_000_000  # the same bound as MAX_ENTRIES in safe_load
MAX_GLOBALS = 10_000  # distinct names a pickle may import (torch.save writes fewer than 20)


class _Inert:
    """Stands for any class or function a pickle names: calling, building or filling it does nothing."""

    qualname = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _ScanError(Exception):
    pass


class _IdRecorder(pickle.Unpickler):
    """Records ``{storage key: declared bytes}`` from persistent ids; imports and runs nothing."""

    def __init__(self, f: BinaryIO):
        super().__init__(f)
        self.storages: Dict[str, int] = {}
        self.globals: Dict[str, type] = {}

    def find_class(self, module, name):
        qualname = f"{module}.{name}"
        if qualname not in self.globals:
            if len(self.globals) >= MAX_GLOBALS:
                raise _ScanError(f"it names more than {MAX_GLOBALS:,} different classes")
            self.globals[qualname] = type("Inert", (_Inert,), {"qualname": qualname})
        return self.globals[qualname]

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ("storage", b"storage"):
            return _Inert()  # torch refuses these itself; nothing is allocated for them
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise _ScanError(f"a storage declares {numel!r} elements")
        type_name = getattr(storage_type, "qualname", "").rsplit(".", 1)[-1]
        nbytes = numel * ELEMENT_BYTES.get(type_name, UNKNOWN_ELEMENT_BYTES)
        key = str(key)
        self.storages[key] = max(nbytes, self.storages.get(key, 0))
        if len(self.storages) > MAX_STORAGES:
            raise _ScanError(f"it names more than {MAX_STORAGES:,} storages")
        return _Inert()


def declared_storages(f: BinaryIO, recorder: "_IdRecorder") -> int:
    """Fill ``recorder.storages`` from a legacy file open at 0; returns the offset where the storage data starts.

    On a parse error ``recorder`` keeps what it saw before it (torch allocates those too)."""
    for _ in range(3):  # magic number, protocol version, system info: plain values
        _IdRecorder(f).load()
    recorder.load()
    _IdRecorder(f).load()  # the list of storage keys
    return f.tell()


def legacy_storage_problem(path: str, size: int) -> Optional[str]:
    """Why a legacy PyTorch file at ``path`` (``size`` bytes) must not be loaded, or None.

    Refused: storages that declare more bytes in all than the file holds after its
    pickles (each storage's data is stored in the file, 8 bytes of length + data),
    negative or non-integer element counts, more than :data:`MAX_STORAGES` storages or
    :data:`MAX_GLOBALS` class names. A file whose pickles do not parse here is compared
    with its whole size (the storages seen before the damage); anything else about it
    is left to ``torch.load``, which refuses it with its own, more precise, reason
    (this unpickler accepts every opcode torch's ``weights_only`` one does, so torch
    cannot get further into a file than this scan did).
    """
    recorder = None
    try:
        with open(path, "rb") as f:
            recorder = _IdRecorder(f)
            data_start = declared_storages(f, recorder)
    except _ScanError as err:
        return str(err)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, RecursionError, MemoryError, UnicodeDecodeError, OSError):
        data_start = 0
    storages = recorder.storages if recorder is not None else {}
    declared = sum(storages.values())
    available = size - data_start - 8 * len(storages)
    if declared > max(available, 0):
        return (f"its storages declare {declared:,} bytes but the file holds only {max(available, 0):,} bytes of tensor data "
                "(a legacy PyTorch file that would make the loader allocate memory it never fills)")
    return None
