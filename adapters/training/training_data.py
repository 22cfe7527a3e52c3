"""A folder of training images, read one at a time (pure torch + Pillow).

Layout (everything but the images is optional)::

    <folder>/<identity>/<name>.png|.jpg|.jpeg|.webp   images; the sub-folder is the identity id
    <folder>/<name>.png                               an image in the root is an identity of its own
    <same stem>.mask.png                              face / subject mask (white = face)
    <same stem>.txt                                   caption (else the config's caption)
    <same stem>.id.safetensors                        identity features of that photo: ``arcface`` [512]
                                                      (+ any IdentityFeatures field: ``clip_embeds``,
                                                      ``clip_hidden``, ``face_tokens``...)
    <folder>/metadata.jsonl                           {"file": <relative path>, "identity": ..., "caption": ...}
                                                      per line, overriding the above

:class:`ImageFolderIndex` lists file *names* only (sorted, so every process sees the same
order); nothing is decoded until a sample is asked for. :class:`StreamingImages` is an
``IterableDataset`` whose ``k``-th sample for rank ``r`` of ``W`` is the global stream's
position ``p = k * W + r``; position ``p`` is image ``perm_e[p mod n]`` of epoch ``e = p div n``
(``perm_e`` a permutation seeded by ``(seed, e)``). A sample is therefore a pure function of
``(seed, p)``: resuming at a position reproduces the stream exactly, and ranks never overlap.

References for identity-conditioned targets: the features of 1..``max_references`` *other*
photos of the same identity (the photo itself when it is the only one), chosen with a
generator seeded by ``(seed, p)``; with ``need_own_features`` also the photo's own features
(``extras["own_features"]``, FACT's paired condition). ``train.py prepare`` writes the
``.id.safetensors`` files (``nodes/identity/prepare_features.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F

from .training_schedule import step_generator

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_METADATA_BYTES = 64 * 1024**2  # metadata.jsonl: one short line per photo
SIDECAR_SUFFIXES = (".mask.png", ".id.safetensors")


@dataclass(frozen=True)
class Entry:
    path: str
    identity: str
    caption: Optional[str] = None


@dataclass
class Sample:
    """One training photo. image ``[H, W, 3]`` in [0, 1]; mask ``[H, W]`` or None."""

    index: int
    position: int
    path: str
    identity: str
    image: torch.Tensor
    mask: Optional[torch.Tensor]
    caption: str
    features: Optional[Dict[str, torch.Tensor]] = None  # references stacked: {name: [R, ...]}
    extras: Dict[str, object] = field(default_factory=dict)


def _stem(path: str) -> str:
    return os.path.splitext(path)[0]


class ImageFolderIndex:
    """The file list of a training folder (names only; see module docstring)."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        if not os.path.isdir(self.folder):
            raise FileNotFoundError(f"the training folder {folder} does not exist")
        overrides = self._metadata()
        entries: List[Entry] = []
        for root, dirs, files in os.walk(self.folder):
            dirs.sort()
            for name in sorted(files):
                lower = name.lower()
                if not lower.endswith(IMAGE_EXTENSIONS) or lower.endswith(SIDECAR_SUFFIXES):
                    continue
                path = os.path.join(root, name)
                rel = os.path.relpath(path, self.folder).replace(os.sep, "/")
                parent = os.path.dirname(rel)
                meta = overrides.get(rel, {})
                identity = str(meta.get("identity", parent if parent else _stem(rel)))
                entries.append(Entry(path=path, identity=identity, caption=meta.get("caption")))
        if not entries:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
        self.entries = entries
        groups: Dict[str, List[int]] = {}
        for i, e in enumerate(entries):
            groups.setdefault(e.identity, []).append(i)
        self.groups = groups

    def _metadata(self) -> Dict[str, dict]:
        path = os.path.join(self.folder, "metadata.jsonl")
        out: Dict[str, dict] = {}
        if not os.path.isfile(path):
            return out
        from .training_config_checks import TrainingConfigError

        def refuse(problem: str):
            return TrainingConfigError("data.folder", f"{path} {problem}", 'write one JSON object per line, e.g. {"file": "a.png", "caption": "..."}')

        if os.path.getsize(path) > MAX_METADATA_BYTES:
            raise refuse(f"is {os.path.getsize(path):,} bytes, over {MAX_METADATA_BYTES:,}")
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                line = raw.strip()
                if not line:
                    continue
                try:
                    item = json.loads(line.decode("utf-8"))
                except (ValueError, RecursionError):  # bad JSON or UTF-8, integers over the digit limit, nesting bombs
                    raise refuse(f"line {number} is not a JSON object") from None
                if not isinstance(item, dict) or not isinstance(item.get("file"), str):
                    raise refuse(f"line {number} has no \"file\" name")
                out[item["file"].replace("\\", "/")] = item
        return out

    def __len__(self) -> int:
        return len(self.entries)


def load_image(path: str, resolution: int) -> torch.Tensor:
    """Decode, centre-crop square, resize: ``[resolution, resolution, 3]`` float in [0, 1]."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != resolution:
            img = img.resize((resolution, resolution), Image.BICUBIC if s < resolution else Image.LANCZOS)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.reshape(resolution, resolution, 3).float() / 255.0


def load_mask(path: str, resolution: int) -> Optional[torch.Tensor]:
    from PIL import Image

    if not os.path.isfile(path):
        return None
    with Image.open(path) as img:
        img = img.convert("L")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((resolution, resolution), Image.BILINEAR)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.reshape(resolution, resolution).float() / 255.0


def load_features(path: str) -> Optional[Dict[str, torch.Tensor]]:
    if not os.path.isfile(path):
        return None
    from ..weights.safe_load import read_weight_file  # content-sniffed, size-checked, bounded
    from ..weights.weight_dtypes import usable_weights

    return {k: v.float() for k, v in usable_weights(read_weight_file(path).tensors, what=os.path.basename(path)).items()}


class StreamingImages(torch.utils.data.IterableDataset):
    """The training stream (see module docstring). ``start``: samples this rank has already consumed."""

    def __init__(
        self,
        index: ImageFolderIndex,
        resolution: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        caption: str = "",
        max_references: int = 0,
        need_features: bool = False,
        need_own_features: bool = False,
    ):
        super().__init__()
        self.index = index
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.rank, self.world = int(rank), int(world)
        self.start = int(start)
        self.caption = caption
        self.max_references = int(max_references)
        self.need_features = need_features
        self.need_own_features = need_own_features
        self._perm_epoch = -1
        self._perm: Optional[torch.Tensor] = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.index), generator=gen)
            self._perm_epoch = epoch
        return self._perm

    def position(self, k: int) -> int:
        """Global stream position of this rank's ``k``-th sample."""
        return k * self.world + self.rank

    def sample(self, position: int) -> Sample:
        n = len(self.index)
        i = int(self.permutation(position // n)[position % n])
        entry = self.index.entries[i]
        stem = _stem(entry.path)
        caption = entry.caption
        if caption is None and os.path.isfile(stem + ".txt"):
            with open(stem + ".txt", encoding="utf-8") as f:
                caption = f.read().strip()
        sample = Sample(
            index=i,
            position=position,
            path=entry.path,
            identity=entry.identity,
            image=load_image(entry.path, self.resolution),
            mask=load_mask(stem + ".mask.png", self.resolution),
            caption=caption if caption else self.caption,
        )
        if self.need_features:
            sample.features = self.reference_features(i, position)
        if self.need_own_features:
            sample.extras["own_features"] = self.features_of(i)
        return sample

    def features_of(self, i: int) -> Dict[str, torch.Tensor]:
        """Photo ``i``'s own features, stacked as one reference ``{name: [1, ...]}`` (FACT's paired condition)."""
        path = self.index.entries[i].path
        f = load_features(_stem(path) + ".id.safetensors")
        if f is None:
            raise FileNotFoundError(f"{path} has no identity features ({_stem(path)}.id.safetensors); run the trainer's 'prepare' command on the folder first")
        return {name: t[None] for name, t in f.items()}

    def reference_features(self, i: int, position: int) -> Dict[str, torch.Tensor]:
        """Stacked features ``{name: [R, ...]}`` of other photos of the same identity."""
        group = [j for j in self.index.groups[self.index.entries[i].identity] if j != i] or [i]
        gen = step_generator(self.seed, position, stream=7)
        order = torch.randperm(len(group), generator=gen).tolist()
        count = len(group) if self.max_references <= 0 else 1 + int(torch.randint(0, min(self.max_references, len(group)), (), generator=gen))
        chosen = [group[o] for o in order[:count]]
        feats = []
        for j in chosen:
            f = load_features(_stem(self.index.entries[j].path) + ".id.safetensors")
            if f is None:
                raise FileNotFoundError(
                    f"{self.index.entries[j].path} has no identity features ({_stem(self.index.entries[j].path)}.id.safetensors); "
                    "run the trainer's 'prepare' command on the folder first"
                )
            feats.append(f)
        names = set(feats[0])
        return {name: torch.stack([f[name] for f in feats if name in f]) for name in names if all(name in f for f in feats)}

    def __iter__(self) -> Iterator[Sample]:
        k = self.start
        while True:
            yield self.sample(self.position(k))
            k += 1


def collate(samples: List[Sample]) -> dict:
    """Stack a batch: images ``[B, H, W, 3]``, masks ``[B, H, W]`` (ones where a sample has none), captions, features list."""
    images = torch.stack([s.image for s in samples])
    masks = torch.stack([s.mask if s.mask is not None else torch.ones(s.image.shape[:2]) for s in samples])
    return {
        "images": images,
        "masks": masks,
        "has_mask": torch.tensor([s.mask is not None for s in samples]),
        "captions": [s.caption for s in samples],
        "features": [s.features for s in samples],
        "own_features": [s.extras.get("own_features") for s in samples],
        "positions": [s.position for s in samples],
        "paths": [s.path for s in samples],
    }


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(masks.float()[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
