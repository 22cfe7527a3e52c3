"""Write the template-browser thumbnail of every example workflow: example_workflows/<name>.jpg.

    python scripts/workflow_thumbnails.py [--check]

ComfyUI (0.3.75's ``/api/workflow_templates`` route, app/custom_node_manager.py) serves a
pack's ``example_workflows/`` folder; its page (comfyui-frontend-package 1.32.9) shows each
``<name>.json`` as a template with the thumbnail ``<name>.jpg`` beside it, in a square card,
titled and described by the file name only, in the server's directory order. So the
thumbnail carries what the page cannot show otherwise: the workflow's place in the order
(scripts/workflow_catalog.py; 1 = start here) and its one-line description (the workflow's
``extra.identity_attention.description``), under its screenshot from docs/screenshots/.

Each JPEG's comment records the rank and description it was drawn with;
tests/test_template_browser.py compares them with the workflows, so a changed description
or order fails until this script runs again (``--check`` does the same comparison).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import workflow_catalog  # noqa: E402

WORKFLOWS = REPO / "example_workflows"
SCREENSHOTS = REPO / "docs" / "screenshots"
SIZE = 512  # the page shows a square card
CAPTION = 132  # pixels of text band under the screenshot
BACKGROUND = (32, 32, 36)
ACCENT = (138, 170, 136)  # the workflows' identity-green groups
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "Arial.ttf", "arial.ttf")


def description(name: str) -> str:
    data = json.loads((WORKFLOWS / f"{name}.json").read_text())
    return data.get("extra", {}).get("identity_attention", {}).get("description", "")


def comment(name: str) -> str:
    """What the JPEG comment holds: ``<rank>|<description>``."""
    return f"{workflow_catalog.rank(name)}|{description(name)}"


def _font(size: int, bold: bool = False):
    from PIL import ImageFont

    names = FONTS[1::-1] if bold else FONTS
    for name in names:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def draw(name: str):
    """The thumbnail of workflow ``name`` as a PIL image."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    shot_path = SCREENSHOTS / f"{name}.png"
    if shot_path.is_file():
        with Image.open(shot_path) as shot:
            shot = shot.convert("RGB")
            shot.thumbnail((SIZE, SIZE - CAPTION), Image.LANCZOS)
            canvas.paste(shot, ((SIZE - shot.width) // 2, (SIZE - CAPTION - shot.height) // 2))
    pen = ImageDraw.Draw(canvas)
    top = SIZE - CAPTION
    pen.rectangle([0, top, SIZE, SIZE], fill=BACKGROUND)
    rank = workflow_catalog.rank(name)
    badge = f"{rank}  START HERE" if name == workflow_catalog.START_HERE else (str(rank) if rank else "")
    x = 14
    if badge:
        font = _font(22, bold=True)
        width = pen.textlength(badge, font=font)
        pen.rounded_rectangle([x, top + 10, x + width + 20, top + 42], radius=8, fill=ACCENT)
        pen.text((x + 10, top + 13), badge, font=font, fill=(16, 24, 16))
    font = _font(17)
    lines = textwrap.wrap(description(name), width=52)[:4]
    for i, line in enumerate(lines):
        pen.text((x, top + 50 + 20 * i), line, font=font, fill=(232, 232, 232))
    return canvas


def write(name: str) -> Path:
    path = WORKFLOWS / f"{name}.jpg"
    draw(name).save(path, "JPEG", quality=85, optimize=True, comment=comment(name).encode("utf-8"))
    return path


def recorded_comment(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return image.info.get("comment", b"").decode("utf-8", errors="replace")


def out_of_date() -> list:
    """Workflows whose thumbnail is missing or was drawn for another rank or description."""
    stale = []
    for path in sorted(WORKFLOWS.glob("*.json")):
        thumb = path.with_suffix(".jpg")
        if not thumb.is_file() or recorded_comment(thumb) != comment(path.stem):
            stale.append(path.stem)
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a thumbnail is missing or out of date, write nothing")
    args = parser.parse_args()
    if args.check:
        stale = out_of_date()
        if stale:
            print(f"thumbnails out of date: {', '.join(stale)}: run python scripts/workflow_thumbnails.py", file=sys.stderr)
            return 1
        return 0
    for path in sorted(WORKFLOWS.glob("*.json")):
        print(f"wrote {write(path.stem).relative_to(REPO)}")
    for orphan in sorted(set(p.stem for p in WORKFLOWS.glob("*.jpg")) - set(p.stem for p in WORKFLOWS.glob("*.json"))):
        (WORKFLOWS / f"{orphan}.jpg").unlink()
        print(f"removed example_workflows/{orphan}.jpg (no workflow)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
