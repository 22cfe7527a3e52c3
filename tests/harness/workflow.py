"""UI-format ComfyUI workflows: author them, check them against a host, convert them to API prompts.

A UI workflow (what the ComfyUI page saves and loads, ``version`` 0.4) lists
nodes with their widget values in display order and links as
``[id, from_node, from_slot, to_node, to_slot, type]``. The API prompt (what
``/prompt`` runs) maps node ids to ``class_type`` and named ``inputs``. The
mapping between the two needs the node definitions (``/object_info``): which
inputs are widgets, in which order, and which widgets carry an extra UI-only
value (``control_after_generate`` after a seed, the upload button after an
image combo).
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
IMAGE_NODES = {"LoadImage", "PreviewImage", "SaveImage"}  # they show a picture in the page
NOTE_SIZE = (420, 300)
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


class WorkflowError(ValueError):
    """A workflow does not match the host's node definitions."""


# --- node definitions ---------------------------------------------------------------------------


def _inputs_in_order(definition: dict) -> List[Tuple[str, list]]:
    spec = definition.get("input", {})
    order = definition.get("input_order")
    items = []
    for section in ("required", "optional"):
        entries = spec.get(section, {}) or {}
        names = (order or {}).get(section) or list(entries)
        items += [(name, entries[name]) for name in names if name in entries]
    return items


def is_widget(spec: list) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def ui_only_defaults(name: str, spec: list) -> List[Any]:
    """The UI-only values that follow this widget's value in ``widgets_values``.

    A seed gets a ``control_after_generate`` value ("fixed" keeps examples
    reproducible); an image combo with an upload button stores "image".
    """
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    extra = []
    if options.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed")):
        extra.append("fixed")
    if options.get("image_upload") or options.get("video_upload") or options.get("audio_upload"):
        extra.append("image")
    return extra


def ui_only_values(name: str, spec: list) -> int:
    """How many UI-only values follow this widget's value in ``widgets_values``."""
    return len(ui_only_defaults(name, spec))


def widget_names(definition: dict) -> List[str]:
    return [name for name, spec in _inputs_in_order(definition) if is_widget(spec)]


def expected_widget_count(definition: dict) -> int:
    return sum(1 + ui_only_values(name, spec) for name, spec in _inputs_in_order(definition) if is_widget(spec))


# --- UI -> API ----------------------------------------------------------------------------------


def ui_to_api(workflow: dict, object_info: Dict[str, dict]) -> Dict[str, dict]:
    """Convert a UI workflow to an API prompt for ``/prompt``.

    Raises :class:`WorkflowError` for unknown node types, widget-count
    mismatches, bypassed/muted nodes it cannot honour, or dangling links.
    """
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {int(l[0]): l for l in workflow.get("links", [])}

    def source(link_id: int) -> Tuple[int, int]:
        link = links.get(int(link_id))
        if link is None:
            raise WorkflowError(f"link {link_id} is missing from the workflow")
        node_id, slot = int(link[1]), int(link[2])
        node = nodes[node_id]
        if node["type"] == "Reroute":  # follow reroutes to the real output
            upstream = node["inputs"][0].get("link")
            if upstream is None:
                raise WorkflowError(f"reroute {node_id} has no input")
            return source(upstream)
        return node_id, slot

    prompt: Dict[str, dict] = {}
    for node_id, node in sorted(nodes.items()):
        kind = node["type"]
        if kind in VIRTUAL_NODES:
            continue
        if node.get("mode", 0) in (2, 4):
            raise WorkflowError(f"node {node_id} ({kind}) is muted or bypassed; example workflows must not contain such nodes")
        definition = object_info.get(kind)
        if definition is None:
            raise WorkflowError(f"node {node_id}: type {kind!r} is not installed in this ComfyUI")
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) or [] if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        expected = expected_widget_count(definition)
        if len(values) != expected:
            raise WorkflowError(f"node {node_id} ({kind}) has {len(values)} widget values, the host expects {expected} ({widget_names(definition)})")
        inputs: Dict[str, Any] = {}
        position = 0
        for name, spec in _inputs_in_order(definition):
            if is_widget(spec):
                value = values[position]
                position += 1 + ui_only_values(name, spec)
                if name in linked:
                    upstream, slot = source(linked[name])
                    if nodes[upstream]["type"] == "PrimitiveNode":
                        inputs[name] = value
                    else:
                        inputs[name] = [str(upstream), slot]
                else:
                    _check_widget_value(kind, node_id, name, spec, value)
                    inputs[name] = value
            elif name in linked:
                upstream, slot = source(linked[name])
                inputs[name] = [str(upstream), slot]
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs}
    return prompt


def _check_widget_value(kind: str, node_id: int, name: str, spec: list, value: Any) -> None:
    choices = spec[0] if isinstance(spec[0], list) else None
    if choices is None and spec[0] == "COMBO" and len(spec) > 1:
        choices = spec[1].get("options")
    if choices is not None and value not in choices and not _is_file_choice(choices) and name not in FOLDER_CHOICES.get(kind, ()):
        raise WorkflowError(f"node {node_id} ({kind}): {name}={value!r} is not one of {choices}")


# Combos that list folders a user downloads (no extension to recognise them by): node type -> widget names.
FOLDER_CHOICES = {
    "IdentityAttentionLoadFaceAnalysis": ("pack",),
    "VAELoader": ("vae_name",),  # with models/vae empty, 0.3.x lists only its built-in "pixel_space" (no extension)
}


def _is_file_choice(choices: list) -> bool:
    """File lists (models, images) depend on what a user has downloaded; do not reject those."""
    return not choices or any("." in str(c) or "/" in str(c) for c in choices)


# --- authoring ----------------------------------------------------------------------------------


@dataclass
class NodeRef:
    node_id: int

    def __getitem__(self, slot: int) -> "OutputRef":
        return OutputRef(self.node_id, slot)


@dataclass(frozen=True)
class OutputRef:
    node_id: int
    slot: int


@dataclass
class _Node:
    node_id: int
    kind: str
    title: Optional[str]
    widgets: Dict[str, Any]
    links: Dict[str, OutputRef]
    color: Optional[str] = None
    size: Tuple[int, int] = (320, 140)


@dataclass
class WorkflowBuilder:
    """Author a UI workflow in code; positions are laid out by graph depth.

    ``object_info`` supplies input order, widget defaults and output types.
    """

    object_info: Dict[str, dict]
    nodes: List[_Node] = field(default_factory=list)
    notes: List[Tuple[str, str, Optional[int]]] = field(default_factory=list)
    groups: List[Tuple[str, List[int], str]] = field(default_factory=list)

    def node(self, kind: str, title: Optional[str] = None, color: Optional[str] = None, **inputs) -> NodeRef:
        if kind not in self.object_info:
            raise WorkflowError(f"unknown node type {kind!r}")
        node_id = len(self.nodes) + 1
        widgets, links = {}, {}
        for name, value in inputs.items():
            (links if isinstance(value, OutputRef) else widgets)[name] = value
        known = {n for n, _ in _inputs_in_order(self.object_info[kind])}
        unknown = set(inputs) - known
        if unknown:
            raise WorkflowError(f"{kind} has no input(s) {sorted(unknown)}")
        self.nodes.append(_Node(node_id, kind, title, widgets, links, color))
        return NodeRef(node_id)

    def note(self, text: str, title: str = "Note", near: Optional[NodeRef] = None) -> None:
        self.notes.append((title, text, near.node_id if near else None))

    def group(self, title: str, members: Sequence[NodeRef], color: str = "#3f789e") -> None:
        self.groups.append((title, [m.node_id for m in members], color))

    # -- serialisation --
    def _depths(self) -> Dict[int, int]:
        depth = {n.node_id: 0 for n in self.nodes}
        incoming = defaultdict(list)
        for n in self.nodes:
            for ref in n.links.values():
                incoming[n.node_id].append(ref.node_id)
        changed = True
        while changed:
            changed = False
            for n in self.nodes:
                for up in incoming[n.node_id]:
                    if depth[n.node_id] < depth[up] + 1:
                        depth[n.node_id] = depth[up] + 1
                        changed = True
        return depth

    # -- layout --
    def _size(self, n: "_Node") -> Tuple[int, int]:
        """A size the page will not need to grow: title, slot rows, widgets, text boxes, image previews."""
        definition = self.object_info[n.kind]
        entries = _inputs_in_order(definition)
        widgets = [(name, spec) for name, spec in entries if is_widget(spec)]
        slots = max(len([1 for _, spec in entries if not is_widget(spec)]), len(definition.get("output", [])))
        rows = sum(1 + ui_only_values(name, spec) for name, spec in widgets)
        multiline = sum(1 for _, spec in widgets if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("multiline"))
        height = 40 + 22 * slots + 26 * rows + 110 * multiline + (240 if n.kind in IMAGE_NODES else 0)
        longest = max([len(f"{name} {n.widgets.get(name, '')}") for name, _ in widgets] + [len(n.title or n.kind)], default=0)
        return (int(min(560, max(320, 60 + 7.5 * longest))), int(height))

    def _layout(self):
        """Positions and sizes: one horizontal band per group (in the order groups were added, then the
        ungrouped nodes), columns by graph depth inside a band, notes in a column on the left."""
        depth = self._depths()
        sizes = {n.node_id: self._size(n) for n in self.nodes}
        grouped = [m for _, members, _ in self.groups for m in members]
        bands = [list(members) for _, members, _ in self.groups]
        rest = [n.node_id for n in self.nodes if n.node_id not in grouped]
        if rest:
            bands.append(rest)
        notes_x, band_x, gap = 40, 40 + NOTE_SIZE[0] + 80 if self.notes else 40, 60
        positions, band_top, band_rects = {}, {}, []
        y = 80.0
        for members in bands:
            members = [m for m in members if m not in positions]
            if not members:
                band_rects.append(None)
                continue
            first = min(depth[m] for m in members)
            columns: Dict[int, List[int]] = defaultdict(list)
            for m in sorted(members):
                columns[depth[m] - first].append(m)
            x, bottom = float(band_x), y
            for col in sorted(columns):
                col_y = y
                for m in columns[col]:
                    positions[m] = (x, col_y)
                    band_top.setdefault(m, y)
                    col_y += sizes[m][1] + gap
                bottom = max(bottom, col_y - gap)
                x += max(sizes[m][0] for m in columns[col]) + 80
            band_rects.append((band_x - 20, y - 60, x - 80 - band_x + 40, bottom - y + 80))
            y = bottom + 140
        note_positions, next_y = [], 80.0
        for _, _, near in self.notes:  # beside the band of the node they explain, never overlapping
            ny = max(band_top.get(near, 80.0) if near else 80.0, next_y)
            note_positions.append((notes_x, ny))
            next_y = ny + NOTE_SIZE[1] + 40
        return depth, positions, sizes, band_rects, note_positions

    def build(self, description: str = "") -> dict:
        depth, positions, sizes, band_rects, note_positions = self._layout()

        ui_nodes, ui_links = [], []
        link_id = 0
        out_links: Dict[Tuple[int, int], List[int]] = defaultdict(list)
        order = sorted(self.nodes, key=lambda n: depth[n.node_id])
        for n in self.nodes:
            definition = self.object_info[n.kind]
            inputs = []
            for name, spec in _inputs_in_order(definition):
                ref = n.links.get(name)
                if is_widget(spec):
                    if ref is not None:
                        link_id += 1
                        ui_links.append([link_id, ref.node_id, ref.slot, n.node_id, len(inputs), self._out_type(ref)])
                        out_links[(ref.node_id, ref.slot)].append(link_id)
                        inputs.append({"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": link_id, "widget": {"name": name}})
                    continue
                entry = {"name": name, "type": spec[0], "link": None}
                if ref is not None:
                    link_id += 1
                    ui_links.append([link_id, ref.node_id, ref.slot, n.node_id, len(inputs), spec[0]])
                    out_links[(ref.node_id, ref.slot)].append(link_id)
                    entry["link"] = link_id
                inputs.append(entry)
            n._inputs = inputs
        for n in self.nodes:
            definition = self.object_info[n.kind]
            outputs = []
            names = definition.get("output_name") or definition.get("output") or []
            for slot, out_type in enumerate(definition.get("output", [])):
                outputs.append({"name": names[slot] if slot < len(names) else out_type, "type": out_type, "links": out_links.get((n.node_id, slot), []), "slot_index": slot})
            values = []
            for name, spec in _inputs_in_order(definition):
                if not is_widget(spec):
                    continue
                values.append(n.widgets[name] if name in n.widgets else _default(spec))
                values.extend(ui_only_defaults(name, spec))
            entry = {
                "id": n.node_id,
                "type": n.kind,
                "pos": list(positions[n.node_id]),
                "size": list(sizes[n.node_id]),
                "flags": {},
                "order": order.index(n),
                "mode": 0,
                "inputs": n._inputs,
                "outputs": outputs,
                "properties": {"Node name for S&R": n.kind},
                "widgets_values": values,
            }
            if n.title:
                entry["title"] = n.title
            if n.color:
                entry["color"] = n.color
            ui_nodes.append(entry)
        next_id = len(self.nodes) + 1
        for (title, text, near), (x, y) in zip(self.notes, note_positions):
            ui_nodes.append(
                {
                    "id": next_id,
                    "type": "Note",
                    "pos": [x, y],
                    "size": list(NOTE_SIZE),
                    "flags": {},
                    "order": len(ui_nodes),
                    "mode": 0,
                    "inputs": [],
                    "outputs": [],
                    "title": title,
                    "properties": {"text": ""},
                    "widgets_values": [text],
                    "color": "#432",
                    "bgcolor": "#653",
                }
            )
            next_id += 1
        ui_groups = []
        for (title, members, color), rect in zip(self.groups, band_rects):
            if rect is not None:
                ui_groups.append({"title": title, "bounding": [round(v) for v in rect], "color": color, "font_size": 24, "flags": {}})
        return {
            "last_node_id": next_id - 1,
            "last_link_id": link_id,
            "nodes": ui_nodes,
            "links": ui_links,
            "groups": ui_groups,
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "identity_attention": {"description": description}},
            "version": 0.4,
        }

    def _out_type(self, ref: OutputRef) -> str:
        kind = next(n.kind for n in self.nodes if n.node_id == ref.node_id)
        return self.object_info[kind]["output"][ref.slot]


def _default(spec: list) -> Any:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind, None)


def load_workflow(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def node_types(workflow: dict) -> set:
    return {n["type"] for n in workflow["nodes"]}
