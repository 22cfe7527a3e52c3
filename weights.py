"""Command line for the pack's weight files: list, download, verify.

Run it from ComfyUI's ``custom_nodes`` folder (``python -m`` accepts the
hyphenated folder name ComfyUI-Manager clones into)::

    cd ComfyUI/custom_nodes
    python -m comfyui-identity-attention.weights list
    python -m comfyui-identity-attention.weights download ip-adapter-faceid-plusv2_sd15 buffalo_l
    python -m comfyui-identity-attention.weights verify

or, from anywhere, run the file itself::

    python ComfyUI/custom_nodes/comfyui-identity-attention/weights.py download antelopev2

Files go to ``<models>/<folder>/<file>`` of their manifest entry; ``<models>``
is ``--models-dir`` or, by default, ``../../models`` seen from the pack
(``ComfyUI/custom_nodes/<pack>/`` -> ``ComfyUI/models``). Every download is
written to ``<file>.part``, resumed if interrupted, checked against the
manifest's size and sha256 and only then renamed. Entries without a published
sha256 are downloaded only with ``--allow-unverified``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

if __name__ == "__main__" and not __package__:  # run as a file: import the pack's modules under a private name
    import types

    _root = os.path.dirname(os.path.abspath(__file__))
    _name = "_identity_attention_cli"
    if _name not in sys.modules:
        _pkg = types.ModuleType(_name)
        _pkg.__path__ = [_root]
        sys.modules[_name] = _pkg
    __package__ = _name

from .adapters.weights.file_hash import sha256_file  # noqa: E402
from .adapters.weights.weight_errors import WeightError  # noqa: E402
from .adapters.weights.weights_manifest import DEFAULT_PATH, load_manifest  # noqa: E402
from .adapters.weights.write_paths import resolve_write_path  # noqa: E402

PACK_ROOT = os.path.dirname(os.path.abspath(__file__))  # abspath, not realpath: a linked pack still finds ComfyUI


def default_models_dir(pack_root: str = PACK_ROOT) -> Optional[str]:
    """``ComfyUI/models`` when the pack sits in ``ComfyUI/custom_nodes/<pack>``; None otherwise."""
    parent = os.path.dirname(os.path.abspath(pack_root))
    if os.path.basename(parent) != "custom_nodes":
        return None
    models = os.path.join(os.path.dirname(parent), "models")
    return models if os.path.isdir(models) else None


def target_path(models_dir: str, entry: dict) -> str:
    return os.path.join(models_dir, entry["folder"], *entry["file"].split("/"))


def _size(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


class _Progress:
    """One line on stderr, redrawn at most every 0.2 s."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream, self.last = label, stream or sys.stderr, 0.0

    def __call__(self, done: int, total: Optional[int]) -> None:
        now = time.monotonic()
        if now - self.last < 0.2 and (total is None or done < total):
            return
        self.last = now
        pct = f" ({100.0 * done / total:5.1f}%)" if total else ""
        self.stream.write(f"\r  {self.label}: {_size(done)} / {_size(total)}{pct}")
        self.stream.flush()

    def end(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def cmd_list(manifest, models_dir: Optional[str], out) -> int:
    rows = [("id", "base", "format", "size", "sha256", "present", "file")]
    for e in manifest.entries:
        present = "-"
        if models_dir:
            present = "yes" if os.path.isfile(target_path(models_dir, e)) else "no"
        rows.append((e["id"], e["base"], e["format"], _size(e["bytes"]), "published" if e["sha256"] else "unknown", present, f"{e['folder']}/{e['file']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] + "\n")
    groups = manifest.groups()
    if groups:
        out.write("\ngroups (download takes these names too): " + ", ".join(f"{g} ({len(v)} files)" for g, v in groups.items()) + "\n")
    return 0


def _needs(manifest, entries) -> List[str]:
    ids = {e["id"] for e in entries}
    groups = manifest.groups()
    missing = []
    for e in entries:
        for req in e.get("requires", []):
            covered = req in ids or (req in groups and all(g["id"] in ids for g in groups[req]))
            if not covered and req not in missing:
                missing.append(req)
    return missing


def cmd_download(manifest, models_dir: str, names: List[str], force: bool, allow_unverified: bool, out, deadline_s: Optional[float] = None) -> int:
    from .adapters.weights.weights_download import DEADLINE_S, download  # the only import of networking code

    deadline_s = DEADLINE_S if deadline_s is None else deadline_s

    try:
        entries = manifest.expand(names)
    except KeyError as err:
        out.write(f"unknown id or group: {err.args[0]}; run `list` to see them\n")
        return 2
    failed = 0
    for e in entries:
        dest = target_path(models_dir, e)
        if os.path.isfile(dest) and not force:
            if e["sha256"] is None or sha256_file(dest) == e["sha256"]:
                out.write(f"{e['id']}: already present at {dest}\n")
                continue
            out.write(f"{e['id']}: {dest} exists but differs from the published file; use --force to replace it\n")
            failed += 1
            continue
        if e["sha256"] is None and not allow_unverified:
            out.write(f"{e['id']}: no published sha256, so the download could not be checked; rerun with --allow-unverified to fetch it anyway\n")
            failed += 1
            continue
        out.write(f"{e['id']}: {e['url']} -> {dest}\n")
        progress = _Progress(e["id"])
        try:
            resolve_write_path(models_dir, f"{e['folder']}/{e['file']}")  # no linked sub-folder out of the models folder, no link as the file
            got = download(e["url"], dest, e["sha256"], e["bytes"], progress=progress, redirect_hosts=e.get("redirect_hosts", ()), deadline_s=deadline_s)
        except WeightError as err:
            progress.end()
            out.write(f"{e['id']}: {err}\n")
            out.write(f"{e['id']}: or download it in a browser: save {e['url']} as {dest}\n")
            failed += 1
            continue
        progress.end()
        out.write(f"{e['id']}: ok" + (" (sha256 verified)" if e["sha256"] else f" (UNVERIFIED, sha256 {got})") + "\n")
    needed = _needs(manifest, entries)
    if needed:
        out.write("also needed to use these: " + " ".join(needed) + "\n")
    return 1 if failed else 0


def cmd_verify(manifest, models_dir: str, names: List[str], out) -> int:
    try:
        entries = manifest.expand(names) if names else manifest.entries
    except KeyError as err:
        out.write(f"unknown id or group: {err.args[0]}\n")
        return 2
    if not names and not any(os.path.isfile(target_path(models_dir, e)) for e in entries):
        out.write(f"nothing to verify: none of the {len(entries)} files weights_manifest.json lists is installed in {models_dir} yet; "
                  "`download ID` fetches them (`list` shows the ids)\n")
        return 0
    bad = 0
    for e in entries:
        path = target_path(models_dir, e)
        if not os.path.isfile(path):
            if names:
                out.write(f"MISSING     {e['id']}  {path}\n")
                bad += 1
            continue
        if e["sha256"] is None:
            out.write(f"UNVERIFIED  {e['id']}  no published sha256 (file sha256 {sha256_file(path)})\n")
            continue
        progress = _Progress(e["id"])
        ok = sha256_file(path, progress=progress) == e["sha256"]
        progress.end()
        out.write(f"{'OK' if ok else 'MISMATCH':<11} {e['id']}  {path}\n")
        bad += 0 if ok else 1
    return 1 if bad else 0


def main(argv: Optional[List[str]] = None, out=None) -> int:
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="python -m comfyui-identity-attention.weights", description="List, download and verify Identity Attention's weight files.")
    parser.add_argument("--models-dir", help="ComfyUI's models folder (default: ../../models from the pack)")
    parser.add_argument("--manifest", default=DEFAULT_PATH, help="the weights manifest (default: the pack's weights_manifest.json)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every known file, and whether it is present")
    d = sub.add_parser("download", help="download files by id or group name")
    d.add_argument("ids", nargs="+")
    d.add_argument("--force", action="store_true", help="replace a present file that differs from the published one")
    d.add_argument("--allow-unverified", action="store_true", help="also download files whose sha256 is not published")
    d.add_argument("--deadline", type=float, default=None, metavar="SECONDS", help="give up a file after this long, keeping the partial file for the next run (default: 6 hours)")
    v = sub.add_parser("verify", help="check present files against their published sha256")
    v.add_argument("ids", nargs="*")
    args = parser.parse_args(argv)
    try:
        return _run(args, out)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; a download in progress kept its .part
        out.write("\ninterrupted; run the same command again to resume\n")
        return 130


def _run(args, out) -> int:
    try:
        manifest = load_manifest(args.manifest)
    except (OSError, ValueError) as err:  # one line, not a traceback
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        out.write(f"cannot use the manifest {args.manifest}: {text[:300]}\n")
        return 2
    models_dir = args.models_dir or default_models_dir()
    if args.command == "list":
        return cmd_list(manifest, models_dir, out)
    if models_dir is None:
        out.write("cannot find ComfyUI's models folder: run this from ComfyUI/custom_nodes/<pack>/ or pass --models-dir PATH\n")
        return 2
    if args.command == "download":
        return cmd_download(manifest, models_dir, args.ids, args.force, args.allow_unverified, out, args.deadline)
    return cmd_verify(manifest, models_dir, args.ids, out)


if __name__ == "__main__":
    sys.exit(main())
