"""Tiny face models with insightface's exact input/output contracts, and photos with planted faces.

Built at test time with ``onnx`` + numpy (no weights are downloaded or committed) and
cached under ``.cache/faces/``:

- detector (named ``det_10g.onnx`` like buffalo_l's): SCRFD contract: input ``input.1``
  ``[1, 3, H, W]`` ((RGB - 127.5) / 128, H and W symbolic), nine outputs in insightface's
  order: scores of strides 8, 16, 32 ``[n_s, 1]``, then boxes ``[n_s, 4]`` (distances l, t, r, b
  from the anchor point in stride units), then keypoints ``[n_s, 10]``; ``n_s = (H/s)(W/s)*2``
  (two anchors), rows ordered (y, x, anchor). insightface routes it to ``SCRFD`` with
  ``use_kps`` and runs its real decoding, NMS, letterboxing and retry code on it.

  What it "sees": at each stride s it averages the s x s cells of the input; a cell is a face
  when it is bright and clearly brighter than every one of its 8 neighbours (score =
  sigmoid(GAIN * (cell - max(neighbours) - MARGIN))). So a face is a bright square of s pixels
  (in detector pixels) aligned to the s-grid on a darker ground; its box is exactly that
  cell, its landmarks sit at :data:`KPS` fractions of the cell. A bright region of 2 cells or
  more is *not* a face at that stride (its cells have bright neighbours): like a real
  detector, faces far larger than the detector's scales are missed, which is what
  retrying at smaller detection sizes fixes.
- recognizer (named ``w600k_r50.onnx``): ArcFace contract: input ``input.1``
  ``[N, 3, 112, 112]`` ((RGB - 127.5) / 127.5), one output ``[N, 512]``: a fixed random
  conv -> ReLU -> average pool -> linear map, so different crops give different embeddings.
- a non-face ONNX file (``[1, 10] -> [1, 10]``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

VERSION = 3  # bump when a builder changes: the cache folder name carries it
STRIDES = (8, 16, 32)
ANCHORS = 2
GAIN, MARGIN = 24.0, 1.3  # normalised units: a face cell must beat its brightest neighbour by 1.3 (~166 levels)
# landmarks as fractions of the face box: subject's right eye, left eye, nose, right / left mouth corner
KPS = np.array([[0.31, 0.40], [0.69, 0.40], [0.50, 0.58], [0.35, 0.78], [0.65, 0.78]], np.float32)
EMBEDDING = 512


def _cache_root() -> Path:
    from harness.host import CACHE

    return Path(CACHE) / "faces" / f"toy-v{VERSION}"


# --------------------------------------------------------------------------------------------- ONNX


def _save(graph, path: Path):
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="identity-attention-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    tmp = path.with_suffix(".part")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def build_detector(path: Path) -> Path:
    """The SCRFD-contract detector described in the module docstring."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    inits = [const("shape1", [-1, 1], np.int64), const("shape4", [-1, 4], np.int64), const("shape10", [-1, 10], np.int64),
             const("gray_w", np.full((1, 3, 1, 1), 1.0 / 3.0)), const("pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64),
             const("pad_value", -4.0), const("hw_axes", [2, 3], np.int64), const("gain", GAIN), const("margin", GAIN * MARGIN)]
    nodes = []
    outputs = {"score": [], "bbox": [], "kps": []}
    box = np.array([0.0, 0.0, 1.0, 1.0], np.float32)  # l, t, r, b: the box is the cell
    for s in STRIDES:
        p = f"s{s}_"
        nodes += [
            helper.make_node("AveragePool", ["input.1"], [p + "pool"], kernel_shape=[s, s], strides=[s, s]),
            helper.make_node("Conv", [p + "pool", "gray_w"], [p + "gray"]),  # [1, 1, h, w] cell brightness
            # brightest of the 8 neighbours: max over the 3x3 window of a copy whose centre is pushed down
            helper.make_node("Pad", [p + "gray", "pads", "pad_value"], [p + "padded"], mode="constant"),
        ]
        shifted = []
        for dy in range(3):
            for dx in range(3):
                if dy == 1 and dx == 1:
                    continue
                name = f"{p}n{dy}{dx}"
                ends = [dy - 2 if dy < 2 else 2**62, dx - 2 if dx < 2 else 2**62]
                inits += [const(name + "_st", [dy, dx], np.int64), const(name + "_en", ends, np.int64)]
                nodes.append(helper.make_node("Slice", [p + "padded", name + "_st", name + "_en", "hw_axes"], [name]))
                shifted.append(name)
        nodes += [
            helper.make_node("Max", shifted, [p + "nbr_max"]),
            helper.make_node("Sub", [p + "gray", p + "nbr_max"], [p + "contrast"]),
            helper.make_node("Mul", [p + "contrast", "gain"], [p + "logit0"]),
            helper.make_node("Sub", [p + "logit0", "margin"], [p + "logit"]),
            helper.make_node("Sigmoid", [p + "logit"], [p + "prob"]),
            helper.make_node("Concat", [p + "prob"] * ANCHORS, [p + "score_map"], axis=1),  # [1, A, h, w]
        ]
        inits += [const(p + "box_w", np.zeros((4 * ANCHORS, 3, 1, 1))), const(p + "box_b", np.tile(box, ANCHORS)),
                  const(p + "kps_w", np.zeros((10 * ANCHORS, 3, 1, 1))), const(p + "kps_b", np.tile(KPS.reshape(-1), ANCHORS))]
        nodes += [helper.make_node("Conv", [p + "pool", p + "box_w", p + "box_b"], [p + "box_map"]),
                  helper.make_node("Conv", [p + "pool", p + "kps_w", p + "kps_b"], [p + "kps_map"])]
        for kind, width, shape in (("score", 1, "shape1"), ("bbox", 4, "shape4"), ("kps", 10, "shape10")):
            src = {"score": p + "score_map", "bbox": p + "box_map", "kps": p + "kps_map"}[kind]
            out = f"{kind}_{s}"
            nodes += [helper.make_node("Transpose", [src], [out + "_t"], perm=[0, 2, 3, 1]),
                      helper.make_node("Reshape", [out + "_t", shape], [out])]
            outputs[kind].append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [f"n{s}", width]))
    graph = helper.make_graph(
        nodes, "toy_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"], inits,
    )
    _save(graph, path)
    return path


def build_recognizer(path: Path, seed: int = 0, size: int = 112, width: int = EMBEDDING, batch="N") -> Path:
    """ArcFace contract: ``[N, 3, size, size] -> [N, width]``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(seed)
    pool = size // 4  # 4x4 grid of 16 channels after a stride-2 conv... pooled to 4x4
    inits = [
        numpy_helper.from_array((rng.randn(16, 3, 5, 5) * 0.15).astype(np.float32), "conv_w"),
        numpy_helper.from_array((rng.randn(16) * 0.1).astype(np.float32), "conv_b"),
        numpy_helper.from_array((rng.randn(16 * 4 * 4, width) / 16.0).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(width, np.float32), "fc_b"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["input.1", "conv_w", "conv_b"], ["conv"], pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("AveragePool", ["relu"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
        helper.make_node("Reshape", ["pooled", "flat"], ["features"]),
        helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "toy_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, width])], inits,
    )
    _save(graph, path)
    return path


def build_non_face(path: Path) -> Path:
    """A valid ONNX file that is no face model: ``x[1, 10] -> x + 1``."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "not_a_face",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(np.ones(10, np.float32), "one")],
    )
    _save(graph, path)
    return path


def toy_pack(root: Optional[Path] = None, name: str = "toypack") -> Path:
    """``<root>/models/<name>/`` with the detector and recognizer (``root`` = the insightface folder)."""
    root = Path(root) if root is not None else _cache_root() / "insightface"
    pack = root / "models" / name
    pack.mkdir(parents=True, exist_ok=True)
    if not (pack / "det_10g.onnx").is_file():
        build_detector(pack / "det_10g.onnx")
    if not (pack / "w600k_r50.onnx").is_file():
        build_recognizer(pack / "w600k_r50.onnx")
    return pack


def copy_pack(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --------------------------------------------------------------------------------------------- photos


def astronaut_face() -> np.ndarray:
    """Eileen Collins' face from scikit-image's ``astronaut`` photo (NASA, public domain), RGB uint8."""
    from skimage import data

    return data.astronaut()[55:185, 160:290]


def noise_texture(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, (size, size, 3)).astype(np.uint8)


def face_texture(texture: np.ndarray, size: int, low: int = 215) -> np.ndarray:
    """``texture`` resized (nearest) to ``size`` and mapped to bright values [low, 255] (a "face" to the toy detector)."""
    h, w = texture.shape[:2]
    ys = (np.arange(size) * h // size).clip(0, h - 1)
    xs = (np.arange(size) * w // size).clip(0, w - 1)
    t = texture[ys][:, xs].astype(np.float32)
    return (low + t * (255 - low) / 255.0).round().astype(np.uint8)


def plant(image: np.ndarray, x: int, y: int, size: int, texture: Optional[np.ndarray] = None, seed: int = 0) -> Tuple[int, int, int, int]:
    """Paint a face of ``size`` pixels with its top-left corner at (x, y); returns its box (x0, y0, x1, y1)."""
    tex = face_texture(texture if texture is not None else noise_texture(seed), size)
    image[y:y + size, x:x + size] = tex if image.ndim == 3 else tex.mean(-1).astype(np.uint8)
    return (x, y, x + size, y + size)


def blank(height: int, width: int, level: int = 0) -> np.ndarray:
    return np.full((height, width, 3), level, np.uint8)


def expected_kps(box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.stack([x0 + KPS[:, 0] * (x1 - x0), y0 + KPS[:, 1] * (y1 - y0)], axis=1).astype(np.float32)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
