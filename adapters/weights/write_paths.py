"""Where the pack may write a file, and how: names checked as a whole, files replaced atomically.

A node's save name (``save_name``, ``filename_prefix``) comes from a workflow, which
anyone may have written. :func:`resolve_write_path` turns ``folder`` + ``name`` into a
path or raises :class:`WritePathError`; the rules hold on every OS (a workflow made on
Linux is also run on Windows, so Windows' rules are checked everywhere, with ``ntpath``):

- no NUL or other control characters; not empty;
- not absolute on either OS: ``/x``, ``\\x``, drive-absolute ``C:/x`` or ``C:\\x``,
  drive-relative ``C:foo``, UNC ``\\\\server\\share`` or ``//server/share``; no ``:``
  anywhere (NTFS reads ``name:stream`` as a hidden stream);
- no ``..`` component; no Windows device names (``CON``, ``NUL``, ``COM1``...); no
  component ending in a dot or space (Windows drops them: two names, one file);
- each component at most :data:`MAX_COMPONENT_BYTES` bytes (UTF-8), the whole name at
  most :data:`MAX_NAME_BYTES`;
- after resolving symbolic links, the path is inside the REAL ``folder``: a linked
  sub-folder pointing elsewhere is refused (the folder itself may be a link, e.g.
  ``models`` on another disk), and the file itself may not be a link;
- no existing FILE on the way (``a.safetensors/b`` when ``a.safetensors`` is a file).

:func:`write_atomically` then writes to a fresh temporary file created inside the target
folder (``O_EXCL``: never through a planted link), fsyncs it and renames it onto the
target, so a reader never sees half a file and nothing outside the folder is touched.
"""

from __future__ import annotations

import ntpath
import os
import posixpath
import tempfile
from typing import Callable, List

from .weight_errors import WeightError

MAX_COMPONENT_BYTES = 255  # ext4, NTFS, APFS
MAX_NAME_BYTES = 1024  # the relative name; Windows' classic MAX_PATH is 260 for the whole path
WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10)), "CONIN$", "CONOUT$"}


class WritePathError(WeightError):
    """A save name that could write outside its folder, or that no OS can store."""


def _refuse(name: str, why: str) -> WritePathError:
    return WritePathError(f"the save name {name!r} {why}", fix="use a plain name such as 'anna' or 'people/anna' (letters, digits, '_', '-', '.', spaces; '/' for a sub-folder)")


def name_parts(name: str) -> List[str]:
    """The components of a relative save name, after the checks of the module docstring that need no disk."""
    if not isinstance(name, str) or not name.strip():
        raise _refuse(str(name), "is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise _refuse(name, "contains a NUL or control character")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise _refuse(name[:40] + "...", f"is longer than {MAX_NAME_BYTES} bytes")
    drive, _ = ntpath.splitdrive(name)
    if drive or posixpath.isabs(name) or ntpath.isabs(name) or name.startswith(("\\", "/")):
        raise _refuse(name, "is an absolute path, a drive (C:...) or a network share (\\\\server\\share); it must be relative to the folder")
    if ":" in name:
        raise _refuse(name, "contains ':' (a drive letter or an NTFS stream on Windows)")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        raise _refuse(name, "names no file")
    for part in parts:
        if part == "..":
            raise _refuse(name, "contains '..' (it would leave the folder)")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise _refuse(name[:40] + "...", f"has a part longer than {MAX_COMPONENT_BYTES} bytes")
        if part.split(".")[0].strip().upper() in WINDOWS_DEVICES:
            raise _refuse(name, f"uses '{part}', a device name on Windows")
        if part[-1] in ". ":
            raise _refuse(name, f"has a part ending in a dot or space ('{part}'), which Windows drops")
    return parts


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_write_path(folder: str, name: str) -> str:
    """``folder/name`` after every check of the module docstring; the folders on the way are NOT created."""
    parts = name_parts(name)
    root_real = os.path.realpath(folder)
    path = os.path.join(folder, *parts)
    current = folder
    for part in parts[:-1]:
        current = os.path.join(current, part)
        if os.path.lexists(current):
            if not _inside(os.path.realpath(current), root_real):
                raise _refuse(name, f"goes through '{current}', a link to {os.path.realpath(current)}, outside {folder}")
            if not os.path.isdir(current):
                raise _refuse(name, f"goes through '{current}', which is a file, not a folder")
    if os.path.islink(path):
        raise _refuse(name, f"names a symbolic link ({path} -> {os.path.realpath(path)}); files are not written through links")
    if os.path.isdir(path):
        raise _refuse(name, f"names an existing folder ({path})")
    if not _inside(os.path.realpath(os.path.dirname(path)), root_real):
        raise _refuse(name, f"would be written outside {folder}")
    return path


def write_atomically(path: str, write: Callable) -> None:
    """Create ``path``'s folder, call ``write(file_object)`` on a fresh temporary file next to it, fsync, rename onto ``path``.

    The temporary file is made with ``O_CREAT | O_EXCL`` (``tempfile.mkstemp``), so a
    link planted under any name cannot redirect the write; on any error it is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path)[:100] + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.remove(temp)
        except OSError:
            pass
        raise


def write_safetensors(path: str, tensors, metadata=None) -> None:
    """``safetensors.torch.save_file`` through :func:`write_atomically`."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    write_atomically(path, lambda f: f.write(data))
