"""The files of an insightface pack against ``weights_manifest.json``: which entry a file is, and whether it is whole.

A pack file that onnxruntime cannot parse is almost always a download that stopped early
(or was saved as an HTML error page). onnxruntime's own words for that are
"Protobuf parsing failed"; :func:`damaged_file_problem` turns it into what an artist can act
on: the file is incomplete or corrupt, its size against the published size (and sha256 when
the size matches), and the command that downloads it again.

Manifest entries of pack files have ``folder: insightface`` and ``file: models/<pack>/<name>``.
A file is matched by pack folder and name first, then by name alone (people rename pack
folders; ``w600k_r50.onnx`` is buffalo_l's wherever it sits). Nothing here imports ComfyUI.

Packages with a ``manifest.json`` (insightface 2.1's model-package manifest V2, which names
the ONNX file of each task): insightface reads the whole manifest into memory and opens the
files it names without the pack's limits. :func:`check_pack_manifest` runs first: the
manifest must be a file inside the pack of at most :data:`MAX_MANIFEST_BYTES`, valid JSON (a
nesting bomb is refused), and every model file it names must be inside the pack, pass
:func:`..safe_load.onnx_file_problem` (ONNX by content, not name; at most 2 GB) and, when
``weights_manifest.json`` knows the file, have its published size, all before any parser
reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Tuple

from ..weights.weights_manifest import manifest_or_none

DOWNLOAD_COMMAND = "python -m comfyui-identity-attention.weights download"
PACK_FOLDER = "insightface"


def pack_file_entry(pack: str, file_name: str, manifest=None) -> Optional[dict]:
    """The manifest entry of ``<pack>/<file_name>`` (by pack and name, else by name alone), or None."""
    manifest = manifest_or_none(manifest)
    if manifest is None:
        return None
    exact = manifest.find(PACK_FOLDER, f"models/{pack}/{file_name}")
    if exact is not None:
        return exact
    same_name = [e for e in manifest.entries if e["folder"] == PACK_FOLDER and e["file"].split("/")[-1] == file_name]
    return same_name[0] if same_name else None


def redownload_command(entry: Optional[dict], pack: str) -> str:
    """The command that fetches the file again (``--force`` replaces the damaged copy)."""
    if entry is not None:
        return f"{DOWNLOAD_COMMAND} {entry['id']} --force"
    return f"{DOWNLOAD_COMMAND} {pack} --force" if pack in ("antelopev2", "buffalo_l") else ""


def parses_as_onnx(path: Path) -> Optional[str]:
    """None when ``path`` parses as an ONNX model (external data not read), else the parser's complaint."""
    try:
        import onnx

        onnx.load(str(path), load_external_data=False)
    except ImportError:
        return None  # cannot tell without onnx; the caller's own error stands
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError and friends
        return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return None


def damaged_file_problem(path: Path, pack: str, load_error: str = "", manifest=None) -> Optional[str]:
    """Why ``path`` (a pack file that failed to load) looks incomplete or corrupt, or None if it does not.

    Only a file that does not parse as ONNX (or that onnxruntime failed to parse, per
    ``load_error``, its message) counts. Then, in order: its size against the manifest's
    published size; at the published size, its sha256; else "does not parse".
    """
    path = Path(path)
    entry = pack_file_entry(pack, path.name, manifest)
    try:
        size = os.path.getsize(path)
    except OSError:
        return None
    parse_error = parses_as_onnx(path)
    if parse_error is None and "protobuf" not in load_error.lower():
        return None  # a whole ONNX file: whatever failed, it was not the download
    published = entry.get("bytes") if entry else None
    if published and size != published:
        what = "incomplete" if size < published else "not the published file"
        return f"{path.name} is {what}: {size:,} bytes, the published file ({entry['id']}) has {published:,}"
    detail = parse_error or load_error
    if entry is not None and entry.get("sha256"):
        from ..weights.file_hash import sha256_file

        if sha256_file(str(path)) == entry["sha256"]:
            return None  # the published bytes: the problem is elsewhere (onnxruntime version...)
        return f"{path.name} is corrupt: it has the published size but not the published sha256 and does not load ({detail})"
    return f"{path.name} is incomplete or corrupt: it does not parse as an ONNX model ({detail})"


MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 1024**2  # a package manifest is under 2 KB; insightface reads it whole


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def check_pack_manifest(pack_dir: os.PathLike, pack: str = "", manifest=None) -> Tuple[Optional[str], List[Path]]:
    """``(problem or None, model files the manifest names)`` for a pack folder (see module docstring).

    A pack without ``manifest.json`` gives ``(None, [])``; so does a manifest that is not
    version 2 (insightface ignores those) once its size and JSON are checked.
    """
    from ..weights.safe_load import onnx_file_problem

    folder = os.path.realpath(pack_dir)
    path = Path(pack_dir) / MANIFEST_NAME
    if not os.path.lexists(path):
        return None, []
    real = os.path.realpath(path)
    if not _inside(real, folder):
        return f"its {MANIFEST_NAME} is a link to {real}, outside the pack folder", []
    if not os.path.isfile(real):
        return f"its {MANIFEST_NAME} is not a file", []
    size = os.path.getsize(real)
    if size > MAX_MANIFEST_BYTES:
        return f"its {MANIFEST_NAME} is {size:,} bytes, over the {MAX_MANIFEST_BYTES:,} a package manifest may have", []
    try:
        with open(real, "rb") as f:
            doc = json.loads(f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError, OSError) as err:
        return f"its {MANIFEST_NAME} is not valid JSON ({type(err).__name__})", []
    if not isinstance(doc, dict):
        return f"its {MANIFEST_NAME} is not a JSON object", []
    tasks = doc.get("tasks")
    if doc.get("manifest_version") != 2 or not isinstance(tasks, dict):
        return None, []
    files = []
    for task, spec in tasks.items():
        name = spec.get("file") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            continue  # insightface refuses the manifest itself
        if "\x00" in name or os.path.isabs(name) or ".." in Path(name.replace("\\", "/")).parts:
            return f"its {MANIFEST_NAME} names '{name}' for {task}, a path outside the pack folder", []
        target = os.path.realpath(os.path.join(folder, name))
        if not _inside(target, folder):
            return f"its {MANIFEST_NAME} names '{name}' for {task}, which leads to {target}, outside the pack folder", []
        if not os.path.isfile(target):
            continue  # insightface reports a missing file by name
        problem = onnx_file_problem(target)
        if problem:
            return f"the {task} model {name} named by its {MANIFEST_NAME}: {problem}", []
        entry = pack_file_entry(pack, os.path.basename(name), manifest) if pack else None
        published = entry.get("bytes") if entry else None
        actual = os.path.getsize(target)
        if published and actual != published:
            what = "incomplete" if actual < published else "not the published file"
            return f"the {task} model {name} is {what}: {actual:,} bytes, the published file ({entry['id']}) has {published:,}", []
        files.append(Path(target))
    return None, files
