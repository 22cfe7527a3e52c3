"""``weights_manifest.json``: every weight file the pack knows, and its schema.

The manifest sits at the pack root. It is read by the loader node (sha256
check on request, size sanity, FaceID-Plus version) and by the download
command; nothing else in the pack touches the network.

Schema (version ``identity-attention-weights/1``)::

    {
      "schema": "identity-attention-weights/1",
      "entries": [ ENTRY, ... ]
    }

ENTRY fields (all required unless marked optional):

    id           unique, lowercase: [a-z0-9][a-z0-9._-]*  (what `download ID` takes)
    file         path of the file inside its folder, "/" separated, no "..", not absolute
                 (e.g. "ip-adapter_sd15.safetensors", "models/antelopev2/glintr100.onnx")
    folder       the ComfyUI model folder it goes to: one of FOLDERS below
                 (resolved as <ComfyUI>/models/<folder>/<file>)
    url          where to download it: https://... (http only for 127.0.0.1 / localhost mirrors)
    sha256       64 lowercase hex digits, or null when no public page gave it
    bytes        size in bytes (int > 0), or null when unknown
    verified     true only when sha256 AND bytes were read from a public page of the file
                 (Hugging Face LFS details / pointer); false otherwise
    source       where sha256 / bytes were read (required when verified is true)
    format       what the file holds: a weight_formats name (ip_adapter, faceid, ...) or one of
                 lora, onnx, clip_vision, transface, eva_clip, face_parsing, controlnet,
                 checkpoint (the base models the example workflows name, so their download
                 links come from here too), diffusion_model / text_encoder / vae (a Flux base
                 model's parts, loaded separately)
    base         sd15 | sdxl | sd2-inpaint | flux | any (encoders used with every base)
    license      the license or terms of the file as its publisher states them
    nodes        node ids (IdentityAttention...) that use the file; may be empty (with a note)
    description  one line (no newline, at most 200 characters)
    group        optional: a name several entries share (e.g. "antelopev2"); `download GROUP` takes all
    variant      optional: what the keys cannot tell (e.g. FaceID-Plus "v1" / "v2")
    requires     optional: ids of other entries this file needs to be useful
    note         optional: anything an artist should know (unverified URL, missing encoder...)
    redirect_hosts optional: hosts the download may be redirected to besides the URL's own host
                 (exact names or "*.example.com"); only https redirects are followed, see
                 adapters/weights/weights_download.py (its KNOWN_REDIRECTS covers huggingface.co's CDN)

:func:`validate_manifest` returns a list of problems (empty when valid); the
tests run it on the shipped file.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

SCHEMA = "identity-attention-weights/1"
FOLDERS = (
    "ipadapter", "instantid", "pulid", "identity_attention", "insightface", "clip_vision", "loras", "facexlib", "controlnet", "checkpoints",
    "diffusion_models", "text_encoders", "vae",  # Flux loads its parts separately (UNETLoader, DualCLIPLoader, VAELoader)
)
BASES = ("sd15", "sdxl", "sd2-inpaint", "flux", "any")
FILE_FORMATS = (
    "ip_adapter", "ip_adapter_plus", "ip_adapter_full_face", "faceid", "faceid_plus", "instantid", "pulid", "fact", "pva", "native",
    "lora", "onnx", "clip_vision", "transface", "eva_clip", "face_parsing", "controlnet", "checkpoint", "pulid_flux",
    "xlabs_flux_ip_adapter", "instantx_flux_ip_adapter", "diffusion_model", "text_encoder", "vae",
)
REQUIRED = ("id", "file", "folder", "url", "sha256", "bytes", "verified", "format", "base", "license", "nodes", "description")
OPTIONAL = ("source", "group", "variant", "requires", "note", "redirect_hosts")
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$")
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_LOCAL_HTTP = re.compile(r"^http://(127\.0\.0\.1|localhost)(:\d+)?/")

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PATH = os.path.join(PACK_ROOT, "weights_manifest.json")


def _file_problem(file: str) -> Optional[str]:
    if not isinstance(file, str) or not file:
        return "file must be a non-empty string"
    parts = file.split("/")
    if file.startswith("/") or "\\" in file or ":" in parts[0] or ".." in parts or "." in parts or "" in parts or "\x00" in file:
        return f"file {file!r} must be a relative '/'-separated path without '.' or '..' parts"
    return None


def validate_entry(entry: Mapping, node_ids: Optional[Iterable[str]] = None) -> List[str]:
    problems: List[str] = []
    eid = entry.get("id", "<no id>")

    def bad(text: str) -> None:
        problems.append(f"{eid}: {text}")

    for key in REQUIRED:
        if key not in entry:
            bad(f"missing field '{key}'")
    for key in entry:
        if key not in REQUIRED and key not in OPTIONAL:
            bad(f"unknown field '{key}'")
    if problems:
        return problems
    if not isinstance(entry["id"], str) or not _ID.match(entry["id"]):
        bad("id must match [a-z0-9][a-z0-9._-]*")
    problem = _file_problem(entry["file"])
    if problem:
        bad(problem)
    if entry["folder"] not in FOLDERS:
        bad(f"folder {entry['folder']!r} is not one of {', '.join(FOLDERS)}")
    url = entry["url"]
    if not isinstance(url, str) or not (url.startswith("https://") or _LOCAL_HTTP.match(url)):
        bad("url must be https:// (http only for 127.0.0.1 / localhost)")
    sha = entry["sha256"]
    if sha is not None and (not isinstance(sha, str) or not _SHA.match(sha)):
        bad("sha256 must be 64 lowercase hex digits or null")
    size = entry["bytes"]
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        bad("bytes must be a positive integer or null")
    if not isinstance(entry["verified"], bool):
        bad("verified must be true or false")
    elif entry["verified"]:
        if sha is None or size is None:
            bad("verified is true but sha256 or bytes is null")
        if not entry.get("source"):
            bad("verified entries need a 'source' saying where sha256 and bytes were read")
    if entry["format"] not in FILE_FORMATS:
        bad(f"format {entry['format']!r} is not one of {', '.join(FILE_FORMATS)}")
    if entry["base"] not in BASES:
        bad(f"base {entry['base']!r} is not one of {', '.join(BASES)}")
    if not isinstance(entry["license"], str) or not entry["license"].strip():
        bad("license must be a non-empty string")
    nodes = entry["nodes"]
    if not isinstance(nodes, list) or not all(isinstance(n, str) and n.startswith("IdentityAttention") for n in nodes):
        bad("nodes must be a list of IdentityAttention... node ids")
    elif node_ids is not None:
        unknown = [n for n in nodes if n not in set(node_ids)]
        if unknown:
            bad(f"unknown node ids {unknown}")
    if not nodes and not entry.get("note"):
        bad("an entry no node uses needs a 'note' saying why it is listed")
    desc = entry["description"]
    if not isinstance(desc, str) or not desc.strip() or "\n" in desc or len(desc) > 200:
        bad("description must be one line of at most 200 characters")
    for key in ("source", "group", "variant", "note"):
        if key in entry and (not isinstance(entry[key], str) or not entry[key].strip()):
            bad(f"{key} must be a non-empty string")
    hosts = entry.get("redirect_hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and _HOST.match(h) for h in hosts):
        bad("redirect_hosts must be a list of host names (a.example.com or *.example.com)")
    if "requires" in entry and (not isinstance(entry["requires"], list) or not all(isinstance(r, str) for r in entry["requires"])):
        bad("requires must be a list of ids")
    return problems


def validate_manifest(data: Mapping, node_ids: Optional[Iterable[str]] = None) -> List[str]:
    """Every problem of a manifest (empty list when it is valid)."""
    if not isinstance(data, Mapping):
        return ["the manifest must be a JSON object"]
    problems: List[str] = []
    if data.get("schema") != SCHEMA:
        problems.append(f"schema must be {SCHEMA!r}")
    extra = set(data) - {"schema", "entries", "comment"}
    if extra:
        problems.append(f"unknown top-level fields {sorted(extra)}")
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        return problems + ["entries must be a non-empty list"]
    node_ids = list(node_ids) if node_ids is not None else None
    ids, places = set(), set()
    for entry in entries:
        if not isinstance(entry, Mapping):
            problems.append("every entry must be an object")
            continue
        problems += validate_entry(entry, node_ids)
        eid = _hashable(entry.get("id"))
        if eid in ids:
            problems.append(f"{eid}: duplicate id")
        ids.add(eid)
        place = (_hashable(entry.get("folder")), _hashable(entry.get("file")))
        if place in places:
            problems.append(f"{eid}: another entry already writes {place[0]}/{place[1]}")
        places.add(place)
    groups = {_hashable(e.get("group")) for e in entries if isinstance(e, Mapping) and e.get("group")}
    clash = {g for g in groups if g in ids}
    if clash:
        problems.append(f"group names that are also ids: {sorted(map(str, clash))}")
    for entry in entries:
        if isinstance(entry, Mapping):
            requires = entry.get("requires", []) or []
            for req in requires if isinstance(requires, list) else [requires]:
                if _hashable(req) not in ids and _hashable(req) not in groups:
                    problems.append(f"{entry.get('id')}: requires unknown id or group {req!r}")
    return problems


def _hashable(value):
    """``value`` for set membership: JSON lists and objects (wrong types, reported elsewhere) by their repr."""
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


class Manifest:
    """A loaded, validated manifest."""

    def __init__(self, data: Mapping, path: str = "<memory>"):
        problems = validate_manifest(data)
        if problems:
            raise ValueError(f"{path} is not a valid weights manifest: " + "; ".join(problems[:5]))
        self.path = path
        self.entries: List[dict] = [dict(e) for e in data["entries"]]
        self.by_id: Dict[str, dict] = {e["id"]: e for e in self.entries}

    def groups(self) -> Dict[str, List[dict]]:
        out: Dict[str, List[dict]] = {}
        for e in self.entries:
            if e.get("group"):
                out.setdefault(e["group"], []).append(e)
        return out

    def expand(self, names: Sequence[str]) -> List[dict]:
        """Entries for ids and group names, in order, without repeats; KeyError names the unknown ones."""
        groups = self.groups()
        out, seen, unknown = [], set(), []
        for name in names:
            found = [self.by_id[name]] if name in self.by_id else groups.get(name)
            if not found:
                unknown.append(name)
                continue
            for e in found:
                if e["id"] not in seen:
                    seen.add(e["id"])
                    out.append(e)
        if unknown:
            raise KeyError(", ".join(unknown))
        return out

    def find(self, folder: str, file: str) -> Optional[dict]:
        """The entry that writes ``<folder>/<file>`` (file names compared with '/' separators)."""
        file = file.replace("\\", "/")
        for e in self.entries:
            if e["folder"] == folder and e["file"] == file:
                return e
        return None

    def with_size(self, size: int, fmt: Optional[str] = None) -> List[dict]:
        return [e for e in self.entries if e["bytes"] == size and (fmt is None or e["format"] == fmt)]


_CACHE: Dict[str, Manifest] = {}


def manifest_or_none(manifest: Optional["Manifest"] = None) -> Optional["Manifest"]:
    """``manifest`` if given, else the pack's own; None where it cannot be read (guidance and checks go on without it)."""
    if manifest is not None:
        return manifest
    try:
        return load_manifest()
    except (OSError, ValueError):
        return None


def load_manifest(path: Optional[str] = None) -> Manifest:
    """Read and validate a manifest (the pack's own by default); cached per path and mtime."""
    path = path or DEFAULT_PATH
    key = f"{path}:{os.path.getmtime(path)}"
    if key not in _CACHE:
        with open(path, "r", encoding="utf-8") as f:
            try:
                data = json.load(f)
            except RecursionError:  # "[[[[..." nested deeper than the parser's stack: not a manifest
                raise ValueError(f"{path} is not a valid weights manifest: its JSON is nested too deeply") from None
        _CACHE[key] = Manifest(data, path)
    return _CACHE[key]
