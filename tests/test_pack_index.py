"""What ComfyUI-Manager, the Comfy Registry and the README say about the pack matches the pack.

- node_list.json (the Manager's node list for packs whose mappings are built at import) lists
  exactly the registered nodes (scripts/node_list.py writes it);
- README.md's generated parts (node table, weights table, workflow pictures) are up to date
  (scripts/readme_tables.py writes them), it opens with the two commands, and every picture it
  shows exists;
- pyproject.toml is complete for the Registry, by the rules ComfyUI's own ``comfy_config`` parser
  and the Registry's name rules apply; its icon is in the repository; .comfyignore keeps every
  file ComfyUI loads.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from conftest import pack

REPO = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def script(name: str):
    """A module of scripts/ (they import pack_nodes, which reuses this process's host and pack)."""
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(f"identity_attention_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mappings():
    registered = pack("nodes").NODE_CLASS_MAPPINGS
    assert script("pack_nodes").registered_nodes() == registered  # the scripts see what ComfyUI registers
    return registered


def test_node_list_json_is_in_sync(mappings):
    node_list = script("node_list")
    assert (REPO / "node_list.json").read_text() == node_list.render(mappings), "run: python scripts/node_list.py"
    listed = json.loads((REPO / "node_list.json").read_text())
    assert sorted(listed) == sorted(mappings) and all(listed.values())


def test_first_sentence():
    first = script("pack_nodes").first_sentence
    assert first("Loads a pack from models/x/, e.g. antelopev2. Then more.") == "Loads a pack from models/x/, e.g. antelopev2."
    assert first("Works with SD1.5 and SDXL.  antelopev2 too.") == "Works with SD1.5 and SDXL."


def test_readme_generated_parts_are_in_sync(mappings):
    tables = script("readme_tables")
    readme = (REPO / "README.md").read_text()
    assert tables.render(readme, tables.parts()) == readme, "run: python scripts/readme_tables.py"
    for node_id, cls in mappings.items():
        assert f"`{node_id}`" in readme and cls.DISPLAY_NAME in readme
    for entry in json.loads((REPO / "weights_manifest.json").read_text())["entries"]:
        assert f"`{entry['id']}`" in readme and f"models/{entry['folder']}/{entry['file']}" in readme


def test_readme_opens_with_the_two_commands_and_shows_existing_pictures():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]
    assert readme.index("make demo") < readme.index("## ")  # before any section
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    for workflow in (REPO / "example_workflows").glob("*.json"):
        assert f"docs/screenshots/{workflow.stem}.png" in pictures
    for picture in pictures:
        assert (REPO / picture).is_file(), f"README shows {picture}, which does not exist"


def test_readme_starts_artists_with_one_workflow_its_files_and_commands():
    readme = (REPO / "README.md").read_text()
    catalog = script("workflow_catalog")
    start = readme.index("## Start here")
    assert start < readme.index("## Install") and start < readme.index("## Nodes")
    section = readme[start:readme.index("\n## ", start + 1)]
    assert f"example_workflows/{catalog.START_HERE}.json" in section and "What you should get:" in section
    assert "python -m comfyui-identity-attention.weights download" in section and "python_embeded\\python.exe" in section


def test_readme_clone_url_is_the_repository(pyproject):
    readme = (REPO / "README.md").read_text()
    assert f"git clone {pyproject['project']['urls']['Repository']} " in readme
    assert "<this repository" not in readme


def test_readme_weights_commands_have_their_windows_portable_form():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Weights"):readme.index("<!-- BEGIN GENERATED: weights")]
    posix = re.findall(r"^python -m comfyui-identity-attention\.weights (.+)$", section, re.M)
    windows = re.findall(r"^python_embeded\\python\.exe ComfyUI\\custom_nodes\\comfyui-identity-attention\\weights\.py (.+)$", section, re.M)
    assert posix and posix == windows


# --------------------------------------------------------------------------------------------- Registry

REGISTRY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*$")  # no leading/doubled specials
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")  # comfy_config/config_parser.py
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend", "GPU :: Apple Metal"}


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_project_section_is_complete(pyproject):
    project = pyproject["project"]
    assert len(project["name"]) < 100 and REGISTRY_NAME.match(project["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    init = (REPO / "__init__.py").read_text()
    assert f'__version__ = "{project["version"]}"' in init, "pyproject.toml and __init__.py disagree on the version"
    assert (REPO / project["license"]["file"]).is_file() and project["description"] and project["requires-python"]
    assert project["readme"] == "README.md"
    urls = project["urls"]
    assert urls["Repository"].startswith("https://") and {"Documentation", "Issues"} <= set(urls)
    classifiers = project["classifiers"]
    systems = [c[len("Operating System :: "):] for c in classifiers if c.startswith("Operating System :: ")]
    assert systems and all(s.startswith(OS_PREFIXES) for s in systems)  # else the Registry drops all of them
    accelerators = [c[len("Environment :: "):] for c in classifiers if c.startswith("Environment ::")]
    assert all(a in ACCELERATORS for a in accelerators)
    assert any(c.startswith("License :: ") for c in classifiers)


def test_tool_comfy_section_and_icon(pyproject):
    from PIL import Image

    comfy = pyproject["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "Identity Attention"
    repository = pyproject["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    assert comfy["Icon"].startswith(prefix), "the icon is served from this repository"
    icon = REPO / comfy["Icon"][len(prefix):]
    assert icon.is_file() and icon.suffix in (".png", ".svg", ".jpg", ".gif")
    with Image.open(icon) as image:
        assert image.width <= 800 and image.height <= 400 and image.width == image.height  # the Registry's limit; square
    assert icon.stat().st_size < 100_000
    assert isinstance(comfy["includes"], list) and all((REPO / p).exists() for p in comfy["includes"])
    specifiers = pytest.importorskip("packaging.specifiers")
    required = specifiers.SpecifierSet(comfy["requires-comfyui"])  # comfy-cli's validate_version rejects anything else
    assert "0.3.75" in required and "0.3.64" in required  # the tested host, and the version of the report


def test_comfyignore_keeps_what_comfyui_loads():
    patterns = [line.strip() for line in (REPO / ".comfyignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    needed = ["__init__.py", "nodes/__init__.py", "adapters/__init__.py", "web/show_text.js", "weights.py", "weights_manifest.json",
              "install.py", "requirements.txt", "node_list.json", "pyproject.toml", "README.md", "LICENSE", "docs/icon.png"]
    needed += [str(p.relative_to(REPO)) for p in (REPO / "example_workflows").glob("*.json")]
    needed += [str(p.relative_to(REPO)) for p in (REPO / "example_workflows").glob("*.jpg")]  # the template browser's thumbnails
    for path in needed:
        assert (REPO / path).exists(), path
        assert not any(path == p.rstrip("/") or path.startswith(p if p.endswith("/") else p + "/") for p in patterns), f".comfyignore drops {path}"


def test_manager_reads_the_pack_header():
    """ComfyUI-Manager's scanner reads @title / @nickname lines of the pack's Python files (the node badge)."""
    lines = (REPO / "__init__.py").read_text().splitlines()
    fields = dict(line[1:].split(":", 1) for line in lines if line.startswith("@"))
    assert fields["title"].strip() == fields["nickname"].strip() == "Identity Attention" and fields["description"].strip()


def test_every_node_is_what_the_readme_promises(mappings):
    """One category tree, a description, and a tooltip on every input and output (README: "Nodes")."""
    for node_id, cls in mappings.items():
        assert node_id.startswith("IdentityAttention") and cls.CATEGORY.split("/")[0] == "identity_attention", node_id
        assert cls.CATEGORY.split("/")[1] in ("encode", "attention", "guidance", "train", "weights", "inspect"), node_id
        assert cls.DESCRIPTION and cls.DISPLAY_NAME, node_id
        for section, inputs in cls.INPUT_TYPES().items():
            if section == "hidden":
                continue
            for name, spec in inputs.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), f"{node_id}: one tooltip per output"
