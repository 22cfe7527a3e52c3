"""What to tell an artist about a weight file a loader cannot use: which file, where it goes, how to get it.

Every loader of the pack (and any new one) words its file problems through
these functions, so "missing", "nothing downloaded yet" and "broken download"
read the same everywhere and always end with a command that fixes them:

- :func:`missing_file`: a loader names a file that is not in its folders
  (a workflow from someone else, a file not downloaded yet). When
  weights_manifest.json knows the file, the message gives its manifest id,
  where it goes (``models/<folder>/<file>``), the download command and the URL
  to save by hand.
- :func:`no_files`: a loader's list is empty; the list shows
  :func:`placeholder` instead, and running it says what to download.
- :func:`damaged_file`: a file that does not parse. When the manifest knows it
  and the file's size (or, for a complete size, its sha256) differs from the
  released file, it is called an incomplete or corrupt download, with the
  command that downloads it again (``--force`` replaces the bad copy).

Pure functions over manifest entries (``adapters/weights/weights_manifest.py``);
nothing here imports ComfyUI. They return :class:`WeightError`, which
``nodes/`` re-raises with the node and input names.
"""

from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence

from .file_hash import sha256_file
from .weight_errors import WeightError

DOWNLOAD_COMMAND = "python -m comfyui-identity-attention.weights download"
WHERE_TO_RUN = "from ComfyUI/custom_nodes"
FEW_FITS = 3  # up to this many files fit a loader: the empty-folder message names each


def download_command(ids: Sequence[str], force: bool = False) -> str:
    """The shell line that downloads manifest ids (run in ComfyUI/custom_nodes)."""
    return " ".join([DOWNLOAD_COMMAND, *ids] + (["--force"] if force else []))


def destination(entry: dict) -> str:
    """Where a manifest entry goes, as an artist reads it: ``models/<folder>/<file>``."""
    return f"models/{entry['folder']}/{entry['file']}"


def placeholder(folders: Iterable[str]) -> str:
    """The one list entry a loader shows when its folders hold no file yet."""
    return f"(no files in {', '.join(f'models/{f}/' for f in folders)} yet: queue the workflow to see what to download)"


def is_placeholder(value) -> bool:
    return isinstance(value, str) and value.startswith("(no files in ")


def entries_for(manifest, value: str, folders: Sequence[str]) -> List[dict]:
    """Manifest entries a loader's value names: ``<folder>/<file>``, a ``<file>`` in one of ``folders``, or a group."""
    if manifest is None or not isinstance(value, str):
        return []
    value = value.replace("\\", "/")
    folder, _, rest = value.partition("/")
    found = []
    for e in manifest.entries:
        if e["folder"] in folders and (e["file"] == value or (e["folder"] == folder and e["file"] == rest)):
            found.append(e)
    if not found:
        found = [e for e in manifest.groups().get(value, []) if e["folder"] in folders]
    return found


def _get_it(entries: List[dict]) -> str:
    ids = [e.get("group") or e["id"] for e in entries]
    ids = list(dict.fromkeys(ids))
    unverified = [e for e in entries if e["sha256"] is None]
    command = download_command(ids)
    if unverified:
        command += " --allow-unverified"
    text = f"download it {WHERE_TO_RUN} with `{command}`"
    if len(entries) == 1:
        text += f", or save {entries[0]['url']} as {destination(entries[0])} by hand"
    return text + "; then refresh the page"


def missing_file(value: str, folders: Sequence[str], searched: Sequence[str], manifest) -> WeightError:
    """``value`` is not in the loader's folders: say what it is and how to get it."""
    entries = entries_for(manifest, value, folders)
    where = "; ".join(searched) or ", ".join(f"models/{f}/" for f in folders)
    if not entries:
        return WeightError(
            f"'{value}' is not in the model folders (searched: {where})",
            fix=f"put the file there and refresh the page, or pick another file from the list "
            f"(`{DOWNLOAD_COMMAND.replace(' download', ' list')}` shows the files this pack knows)",
        )
    if len(entries) == 1:
        e = entries[0]
        what = f"'{value}' is not downloaded yet: it is {e['id']} in weights_manifest.json and goes to {destination(e)} (searched: {where})"
    else:
        group = entries[0].get("group") or value
        what = (f"'{value}' is not downloaded yet: it is the {group} set of {len(entries)} files in weights_manifest.json and goes to "
                f"models/{entries[0]['folder']}/{os.path.dirname(entries[0]['file'])}/ (searched: {where})")
    return WeightError(what, fix=_get_it(entries))


def no_files(folders: Sequence[str], searched: Sequence[str], manifest, node_id: Optional[str] = None) -> WeightError:
    """The loader's folders are empty: name the files that fit this loader."""
    where = "; ".join(searched) or ", ".join(f"models/{f}/" for f in folders)
    fits = [e for e in (manifest.entries if manifest is not None else []) if e["folder"] in folders and (node_id is None or node_id in e["nodes"])]
    ids = list(dict.fromkeys(e.get("group") or e["id"] for e in fits))
    if 1 <= len(ids) <= FEW_FITS:  # name them: which file, where it goes, the command
        named = []
        for i in ids:
            group = [e for e in fits if (e.get("group") or e["id"]) == i]
            goes = destination(group[0]) if len(group) == 1 else f"models/{group[0]['folder']}/{os.path.dirname(group[0]['file'])}/"
            named.append(f"{i} (goes to {goes})")
        if len(ids) == 1:
            fix = _get_it(fits)
        else:
            commands = [f"`{download_command([i])}" + (" --allow-unverified" if any(e["sha256"] is None for e in fits if (e.get("group") or e["id"]) == i) else "") + "`"
                        for i in ids]
            fix = f"download the one your workflow uses {WHERE_TO_RUN}: {' or '.join(commands)}; then refresh the page"
        return WeightError(f"no weight file is in {where} yet; this loader reads {' or '.join(named)}", fix=fix)
    known = f"; {len(ids)} known files fit this loader, `{DOWNLOAD_COMMAND.replace(' download', ' list')}` shows them" if ids else ""
    return WeightError(
        f"no weight file is in {where} yet",
        fix=f"download the files the workflow's 'Download first' note names {WHERE_TO_RUN} with `{DOWNLOAD_COMMAND} ID`{known}; then refresh the page",
    )


def damaged_file(err: WeightError, path: str, entry: Optional[dict]) -> WeightError:
    """A file that failed to parse: an incomplete or corrupt download when it differs from the released file.

    Size first (free); with the complete size, the sha256 (read only on this failure path).
    Files the manifest does not know, or that match the released file, keep ``err``.
    """
    if entry is None:
        return err
    try:
        size = os.path.getsize(path)
    except OSError:
        return err
    if entry["bytes"] is not None and size != entry["bytes"]:
        why = f"{size:,} bytes, the released file has {entry['bytes']:,}"
    elif entry["sha256"] is not None and sha256_file(path) != entry["sha256"]:
        why = "its sha256 differs from the released file's"
    elif entry["bytes"] is None and entry["sha256"] is None:
        why = None  # nothing to compare with: it may still be a cut-off download
    else:
        return err
    verdict = f"is an incomplete or corrupt download ({why})" if why else "may be an incomplete or corrupt download (no published size or sha256 to compare it with)"
    return WeightError(
        f"'{os.path.basename(path)}' {verdict}: {err.problem.rstrip('.')}",
        fix=f"download it again {WHERE_TO_RUN} with `{download_command([entry['id']], force=True)}"
        + (" --allow-unverified" if entry["sha256"] is None else "") + f"`, or save {entry['url']} as {destination(entry)} by hand",
    )
