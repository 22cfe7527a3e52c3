"""Write the generated parts of README.md: the node table, the weights table, the workflow pictures.

    python scripts/readme_tables.py [--check]

Each part sits between marker comments in README.md::

    <!-- BEGIN GENERATED: nodes (scripts/readme_tables.py) -->
    ...
    <!-- END GENERATED: nodes -->

- ``nodes``: every registered node (display name, category, the first sentence of its
  description, the paper it implements: a node class's ``PAPER`` attribute, else
  :data:`PAPERS` below);
- ``weights``: every file of weights_manifest.json (download id linked to its URL, what it is,
  where it goes, base model, size, whether a sha256 is published, license);
- ``start-here``: the files of the first workflow to open (scripts/workflow_catalog.py), with
  links, where they go and the download command in its Linux/macOS and Windows-portable forms;
- ``workflows``: every example workflow, simplest first, with its description, the files it
  needs (from its loaders and weights_manifest.json, scripts/workflow_models.py) and its
  screenshot from docs/screenshots/ (tests/test_browser.py takes them).

``--check`` writes nothing and exits 1 when README.md is out of date; tests/test_pack_index.py
runs the same comparison.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pack_nodes import REPO, first_sentence, registered_nodes  # noqa: E402
import workflow_catalog  # noqa: E402
import workflow_models as wm  # noqa: E402

README = REPO / "README.md"
MANIFEST = REPO / "weights_manifest.json"
WORKFLOWS = REPO / "example_workflows"
SCREENSHOTS = REPO / "docs" / "screenshots"

PVA = "PVA: Xu et al., *Personalized Face Inpainting with Diffusion Models by Parallel Visual Attention*, WACV 2024 ([arXiv 2312.03556](https://arxiv.org/abs/2312.03556))"
MOA = "MoA: Wang et al., *Mixture-of-Attention*, SIGGRAPH Asia 2024"
CA_EDIT = "CA-Edit: Xian et al., *Causality-Aware Condition Adapter for High-Fidelity Local Facial Attribute Editing*, AAAI 2025"
FACT = "FaceChain-FACT: Yu et al., *Face Adapter with Decoupled Training for Identity-preserved Personalization* ([arXiv 2410.12312](https://arxiv.org/abs/2410.12312))"
SEFI = "SeFi-IDE: Li et al., *Beyond Inserting: Learning Identity Embedding for Semantic-Fidelity Personalized Diffusion Generation* ([arXiv 2402.00631](https://arxiv.org/abs/2402.00631))"
NESTED = "Nested Attention: Patashnik et al. ([arXiv 2501.01407](https://arxiv.org/abs/2501.01407))"
# The paper behind each node, where the node class does not say it itself (PAPER attribute).
PAPERS = {
    "IdentityAttentionApplyParallelAttention": PVA + "; decoupled mode: IP-Adapter (Ye et al., 2023)",
    "IdentityAttentionApplyKVMixedAttention": "VisualComposer: *Object-level Visual Prompts for Compositional Image Generation* ([arXiv 2501.01424](https://arxiv.org/abs/2501.01424))",
    "IdentityAttentionApplyMixtureOfAttention": MOA,
    "IdentityAttentionInspectRouter": MOA,
    "IdentityAttentionApplyCA2Gate": CA_EDIT,
    "IdentityAttentionInspectCA2Scores": CA_EDIT,
    "IdentityAttentionApplySTFG": CA_EDIT,
    "IdentityAttentionInspectSTFGBoundary": CA_EDIT,
    "IdentityAttentionApplyFaceAdapter": FACT,
    "IdentityAttentionLoadFaceEncoder": FACT + "; encoder: TransFace",
    "IdentityAttentionEncodeFaceTokens": FACT + "; encoder: TransFace",
    "IdentityAttentionApplyStageTokens": SEFI,
    "IdentityAttentionCreateIdentityTokens": SEFI,
    "IdentityAttentionEncodePromptWithIdentityTokens": SEFI,
    "IdentityAttentionLoadIdentityTokens": SEFI,
    "IdentityAttentionSaveIdentityTokens": SEFI,
    "IdentityAttentionApplyNestedAttention": NESTED,
    "IdentityAttentionFindSubjectToken": NESTED,
    "IdentityAttentionEncodeIdentity": "ArcFace embeddings via insightface: the identity features of PVA, IP-Adapter-FaceID, InstantID and PuLID",
    "IdentityAttentionIdentitySimilarity": "cosine similarity of ArcFace embeddings, the usual face-identity score",
    "IdentityAttentionLoadIdentityAdapter": "weights of IP-Adapter, IP-Adapter-FaceID, InstantID, PuLID, FaceChain-FACT, PVA",
}


def marker(part: str):
    return f"<!-- BEGIN GENERATED: {part} (scripts/readme_tables.py) -->", f"<!-- END GENERATED: {part} -->"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def node_table(mappings: dict) -> str:
    rows = ["| Node | Category | What it does | Paper |", "| --- | --- | --- | --- |"]
    for node_id, cls in sorted(mappings.items(), key=lambda item: (item[1].CATEGORY, item[1].DISPLAY_NAME)):
        paper = getattr(cls, "PAPER", None) or PAPERS.get(node_id, "")
        rows.append(f"| **{_cell(cls.DISPLAY_NAME)}**<br>`{node_id}` | `{cls.CATEGORY}` | {_cell(first_sentence(cls.DESCRIPTION))} | {_cell(paper) or '—'} |")
    return "\n".join(rows)


def _size(n) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def weights_table(manifest: dict) -> str:
    rows = ["| Download id | What it is | Put it in | Base | Size | sha256 | License |", "| --- | --- | --- | --- | --- | --- | --- |"]
    face_packs = {e["group"] for e in manifest["entries"] if e.get("group") and e["folder"] == "insightface"}
    for e in manifest["entries"]:
        group = f" (group `{e['group']}`)" if e.get("group") else ""
        packs = [r for r in e.get("requires", []) if r in face_packs]
        needs = f" **Face pack: `{packs[0]}`** (encode the identity with it)." if packs else ""
        rows.append(
            f"| [`{e['id']}`]({e['url']}){group} | {_cell(e['description'])}{needs} | `models/{e['folder']}/{e['file']}` | {e['base']} | {_size(e['bytes'])} "
            f"| {'published' if e['sha256'] else 'none (`--allow-unverified`)'} | {_cell(e['license'])} |"
        )
    return "\n".join(rows)


def _workflows() -> dict:
    """name -> workflow JSON, simplest first."""
    found = {p.stem: json.loads(p.read_text()) for p in WORKFLOWS.glob("*.json")}
    return {name: found[name] for name in workflow_catalog.ordered(found)}


def _items(workflow: dict, entries: list) -> list:
    return wm.grouped(wm.workflow_files(workflow, entries))


def _item_size(item: list) -> str:
    sizes = [e["bytes"] for e in item]
    return _size(sum(sizes)) if all(sizes) else "?"


def _file_links(workflow: dict, entries: list) -> str:
    """One line: each file (or face pack) the workflow needs, linked, with where it goes."""
    parts = []
    for item in _items(workflow, entries):
        target = wm.item_place(item) + ("" if len(item) > 1 or item[0].get("group") else item[0]["file"])
        parts.append(f"[`{wm.item_id(item)}`]({wm.item_url(item)}) → `{target}`")
    return "Files: " + ", ".join(parts) if parts else "Files: none to download"


def download_commands(ids: list) -> str:
    return (
        "```bash\n"
        f"# from ComfyUI/custom_nodes\n{wm.DOWNLOAD} {' '.join(ids)}\n"
        f"# Windows portable, from the ComfyUI_windows_portable folder\n{wm.DOWNLOAD_WINDOWS} {' '.join(ids)}\n"
        "```"
    )


def start_here(entries: list) -> str:
    name = workflow_catalog.START_HERE
    workflow = _workflows()[name]
    rows = ["| File | Put it in | Size | Link |", "| --- | --- | --- | --- |"]
    ids = []
    for item in _items(workflow, entries):
        e = item[0]
        grouped = len(item) > 1 or e.get("group")
        what = f"the `{wm.item_id(item)}` face pack ({len(item)} files)" if grouped else f"`{e['file']}`"
        if not grouped and posixpath.basename(e["url"]) != posixpath.basename(e["file"]):
            what += f" (the link saves `{posixpath.basename(e['url'])}`: rename it)"
        if e["format"] == "checkpoint":
            what += " (or any checkpoint of the same kind you already have)"
        else:
            ids.append(wm.item_id(item))
        rows.append(f"| {what} | `{wm.item_place(item)}` | {_item_size(item)} | [{'folder' if grouped else 'download'}]({wm.item_url(item)}) |")
    return "\n".join([
        f"Open **`{name}`**: {workflow.get('extra', {}).get('identity_attention', {}).get('description', '')}",
        "",
        "Its files (loading the workflow in a recent ComfyUI offers the `.safetensors` ones in the missing-models dialog):",
        "",
        *rows,
        "",
        "Or download them all with the pack's command (it checks each file against its published sha256):",
        "",
        download_commands(ids),
        "",
        f"What you should get: {workflow_catalog.START_HERE_RESULT}",
    ])


def workflow_gallery(entries: list) -> str:
    parts = []
    for name, data in _workflows().items():
        description = data.get("extra", {}).get("identity_attention", {}).get("description", "")
        start = " (start here)" if name == workflow_catalog.START_HERE else ""
        parts.append(f"#### `{name}.json`{start}\n\n{description}\n\n{_file_links(data, entries)}\n\n![{name}](docs/screenshots/{name}.png)")
    return "\n\n".join(parts) if parts else "(no example workflows yet)"


def parts() -> dict:
    return {
        "nodes": node_table(registered_nodes()),
        "weights": weights_table(json.loads(MANIFEST.read_text())),
        "start-here": start_here(wm.manifest_entries()),
        "workflows": workflow_gallery(wm.manifest_entries()),
    }


def render(readme: str, generated: dict) -> str:
    for part, body in generated.items():
        begin, end = marker(part)
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no markers for '{part}': add the lines\n{begin}\n{end}")
        readme = pattern.sub(lambda _: f"{begin}\n{body}\n{end}", readme)
    return readme


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date, write nothing")
    args = parser.parse_args()
    current = README.read_text()
    wanted = render(current, parts())
    if args.check:
        if wanted != current:
            print("README.md's generated tables are out of date: run python scripts/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    print("README.md tables written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
