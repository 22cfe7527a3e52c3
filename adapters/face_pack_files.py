"""The files of an insightface pack against ``weights_manifest.json``: which entry a file is, and whether it is whole.

A pack file that onnxruntime cannot parse is almost always a download that stopped early
(or was saved as an HTML error page). onnxruntime's own words for that are
"Protobuf parsing failed"; :func:`damaged_file_problem` turns it into what an artist can act
on: the file is incomplete or corrupt, its size against the published size (and sha256 when
the size matches), and the command that downloads it again.

Manifest entries of pack files have ``folder: insightface`` and ``file: models/<pack>/<name>``.
A file is matched by pack folder and name first, then by name alone (people rename pack
folders; ``w600k_r50.onnx`` is buffalo_l's wherever it sits). Nothing here imports ComfyUI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .weights_manifest import manifest_or_none

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
        from .file_hash import sha256_file

        if sha256_file(str(path)) == entry["sha256"]:
            return None  # the published bytes: the problem is elsewhere (onnxruntime version...)
        return f"{path.name} is corrupt: it has the published size but not the published sha256 and does not load ({detail})"
    return f"{path.name} is incomplete or corrupt: it does not parse as an ONNX model ({detail})"
