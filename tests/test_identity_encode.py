"""Identity encoding with the real insightface + onnxruntime code paths on tiny ONNX face models.

The detector and recognizer (tests/toy_faces.py) have insightface's exact input/output
contracts, so insightface's routing, letterboxing, SCRFD decoding, NMS and norm_crop run
unchanged. Faces are planted where the toy detector must find them; a known photo's
embedding is checked against the recognizer evaluated by hand (onnxruntime directly, and
its math in float64 numpy).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import toy_faces as toy
from conftest import pack

fa = pack("adapters.faces.face_analysis")
identity_mod = pack("adapters.faces.identity")


@pytest.fixture(scope="module")
def pack_dir():
    return toy.toy_pack()


@pytest.fixture(scope="module")
def model(pack_dir):
    return fa.load_face_analysis(pack_dir, "CPU", 640)


def three_faces():
    """640x480, black, faces of 32, 16 and 8 px (one per detector stride), left to right A, B, C."""
    img = toy.blank(480, 640)
    a = toy.plant(img, 64, 64, 32, toy.astronaut_face())
    b = toy.plant(img, 320, 224, 16, seed=1)
    c = toy.plant(img, 560, 400, 8, seed=2)
    return img, a, b, c


def one_face(texture=None, seed=0, size=32, x=256, y=192, height=480, width=640):
    img = toy.blank(height, width)
    box = toy.plant(img, x, y, size, texture if texture is not None else toy.astronaut_face(), seed=seed)
    return img, box


def as_image(array_uint8):
    """A ComfyUI IMAGE [1, H, W, C] float in [0, 1]."""
    t = torch.from_numpy(array_uint8).float() / 255.0
    return t.unsqueeze(0) if t.ndim == 3 else t.unsqueeze(0).unsqueeze(-1)


# --------------------------------------------------------------------------------------------- contracts


def test_toy_models_have_insightface_contracts(pack_dir, model):
    import onnx
    import onnxruntime as ort

    det = onnx.load(str(pack_dir / "det_10g.onnx"))
    assert [o.name for o in det.graph.output] == [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    dims = [d.dim_param or d.dim_value for d in det.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, "height", "width"]
    # insightface recognised them as what they stand for, with the real decoder settings
    from insightface.model_zoo.scrfd import SCRFD
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    assert isinstance(model.detector, SCRFD) and isinstance(model.recognizer, ArcFaceONNX)
    assert model.detector.fmc == 3 and list(model.detector._feat_stride_fpn) == [8, 16, 32]
    assert model.detector._num_anchors == 2 and model.detector.use_kps
    assert model.recognizer.input_size == (112, 112)
    assert (model.recognizer.input_mean, model.recognizer.input_std) == (127.5, 127.5)
    session = ort.InferenceSession(str(pack_dir / "w600k_r50.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input.1": np.zeros((3, 3, 112, 112), np.float32)})[0]
    assert out.shape == (3, 512)
    # SCRFD output sizes: n_s = (H/s)(W/s) * 2 anchors, at 640x480
    det_session = ort.InferenceSession(str(pack_dir / "det_10g.onnx"), providers=["CPUExecutionProvider"])
    outs = det_session.run(None, {"input.1": np.zeros((1, 3, 480, 640), np.float32)})
    assert [o.shape for o in outs] == [((480 // s) * (640 // s) * 2, k) for k in (1, 4, 10) for s in (8, 16, 32)]
    assert model.provider == "CPU" and model.recognizer_label == "toypack/w600k_r50.onnx"


def test_planted_faces_land_where_planted(model):
    img, a, b, c = three_faces()
    faces = model.detect(fa.rgb_to_bgr(img), 640)
    assert len(faces) == 3
    got = sorted((tuple(np.round(f.bbox, 3)), f) for f in faces)
    for (bbox, f), planted in zip(got, sorted([a, b, c])):
        assert bbox == tuple(float(v) for v in planted)
        np.testing.assert_allclose(f.kps, toy.expected_kps(planted), atol=1e-3)
        assert f.score > 0.99
    # a photo wider than tall is letterboxed; boxes come back in source pixels
    wide, box = one_face(x=96, y=32, height=160, width=640, size=32)
    (f,) = model.detect(fa.rgb_to_bgr(wide), 640)
    np.testing.assert_allclose(f.bbox, box, atol=1e-3)


# --------------------------------------------------------------------------------------------- embedding by hand


def _recognizer_float64(pack_dir, crop_rgb_uint8):
    """The toy recognizer's math in float64 numpy, from its ONNX weights."""
    import onnx
    from numpy.lib.stride_tricks import sliding_window_view
    from onnx import numpy_helper

    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in onnx.load(str(pack_dir / "w600k_r50.onnx")).graph.initializer}
    x = (crop_rgb_uint8.astype(np.float64) - 127.5) / 127.5  # [112, 112, 3]
    x = np.pad(x, ((2, 2), (2, 2), (0, 0)))
    windows = sliding_window_view(x, (5, 5), axis=(0, 1))  # [112, 112, 3, 5, 5]
    conv = np.einsum("hwcij,ocij->hwo", windows, w["conv_w"]) + w["conv_b"]
    relu = np.maximum(conv, 0.0)
    pooled = relu.reshape(4, 28, 4, 28, 16).mean(axis=(1, 3))  # [4, 4, 16]
    features = pooled.transpose(2, 0, 1).reshape(-1)  # NCHW flatten order
    return features @ w["fc_w"] + w["fc_b"]


def test_embedding_equals_recognizer_run_by_hand_on_the_aligned_crop(model, pack_dir):
    import onnxruntime as ort
    from insightface.utils import face_align

    img, box = one_face()
    record = fa.encode_identity(model, as_image(img)).identity.faces[0]
    kps = toy.expected_kps(box)
    np.testing.assert_allclose(record.landmarks.numpy(), kps, atol=1e-3)
    np.testing.assert_allclose(record.bbox.numpy(), box, atol=1e-3)

    crop_bgr = face_align.norm_crop(fa.rgb_to_bgr(img), landmark=record.landmarks.numpy(), image_size=112)
    crop_rgb = crop_bgr[..., ::-1]
    assert torch.equal(record.crop, torch.from_numpy(crop_rgb.copy()).float() / 255.0)
    assert crop_rgb.std() > 10  # the astronaut's face is in the crop, not a flat fill

    session = ort.InferenceSession(str(pack_dir / "w600k_r50.onnx"), providers=["CPUExecutionProvider"])
    blob = ((crop_rgb.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    by_hand = session.run(None, {"input.1": blob})[0][0]
    np.testing.assert_allclose(record.embedding.numpy(), by_hand, rtol=1e-5, atol=1e-5)
    reference = _recognizer_float64(pack_dir, crop_rgb)
    np.testing.assert_allclose(record.embedding.numpy().astype(np.float64), reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(record.normed_embedding.numpy(), reference / np.linalg.norm(reference), atol=1e-5)
    assert record.image_index == 0 and record.image_size == (480, 640) and not record.flipped


def test_several_references_fuse_and_keep_per_image_embeddings(model):
    photos = [one_face(seed=s, texture=toy.noise_texture(s), x=64 * (s + 1), y=64, height=240 + 32 * s, width=640)[0] for s in range(3)]
    identity = fa.encode_images(model, [as_image(p) for p in photos])  # a list: photos of different sizes
    assert identity.count == 3 and [f.image_index for f in identity.faces] == [0, 1, 2]
    assert [f.image_size for f in identity.faces] == [(240, 640), (272, 640), (304, 640)]
    normed = torch.nn.functional.normalize(torch.stack([f.embedding for f in identity.faces]), dim=-1)
    torch.testing.assert_close(identity.fused_embedding, normed.mean(0))
    assert (normed @ normed.T).triu(1).abs().max() < 0.9999  # three different faces, three embeddings
    # a batch tensor gives the same as a list of single images
    same = fa.encode_images(model, torch.stack([as_image(photos[0])[0]] * 2))
    torch.testing.assert_close(same.embeddings[0], identity.embeddings[0])
    assert same.count == 2


# --------------------------------------------------------------------------------------------- choosing faces


@pytest.mark.parametrize("how, index, expected", [("largest", 0, 0), ("most central", 0, 1), ("index", 0, 0), ("index", 1, 1), ("index", 2, 2)])
def test_choice_of_face_among_several(model, how, index, expected):
    img, a, b, c = three_faces()
    result = fa.encode_identity(model, as_image(img), face=how, face_index=index)
    np.testing.assert_allclose(result.identity.faces[0].bbox.numpy(), [a, b, c][expected], atol=1e-3)
    assert len(result.reports[0].faces) == 3 and result.reports[0].chosen.bbox.tolist() == list([a, b, c][expected])


def test_face_index_out_of_range_says_how_many_faces(model):
    img, *_ = three_faces()
    with pytest.raises(fa.FaceAnalysisError) as err:
        fa.encode_identity(model, as_image(img), face="index", face_index=3)
    text = str(err.value)
    assert "reference image 1 has 3 faces" in text and "face_index 3 does not exist" in text and "left to right" in text
    assert err.value.input_name == "face_index"


# --------------------------------------------------------------------------------------------- bad input


def test_tiny_photo_face_found_by_retrying_smaller_detection_sizes(model):
    tiny = toy.blank(64, 64)
    box = toy.plant(tiny, 32, 32, 16, seed=3)  # upscaled 10x to 640 the face is far too big for the detector
    assert model.detect(fa.rgb_to_bgr(tiny), 640) == []
    result = fa.encode_identity(model, as_image(tiny))
    np.testing.assert_allclose(result.identity.faces[0].bbox.numpy(), box, atol=1e-3)
    report = result.reports[0]
    assert report.det_size == 128 and report.sizes_tried == [640, 576, 512, 448, 384, 320, 256, 192, 128]
    assert "face found at detection size 128" in result.identity.notes[0]
    with pytest.raises(fa.NoFaceError) as err:
        fa.encode_identity(model, as_image(tiny), retry=False)
    assert "no face found in reference image 1" in str(err.value)
    assert "retry_smaller_sizes" in err.value.fix and "det_size" in err.value.fix


def test_no_face_error_names_the_image_and_what_to_try(model):
    good, _ = one_face()
    with pytest.raises(fa.NoFaceError) as err:
        fa.encode_identity(model, [as_image(good), as_image(toy.blank(300, 200, level=90))])
    assert err.value.image_number == 2
    assert str(err.value.problem).startswith("no face found in reference image 2")
    assert "640, 576" in err.value.problem and "128" in err.value.problem
    assert "use a clearer frontal photo or lower det_size" in err.value.fix
    assert err.value.input_name == "images"


def test_grayscale_and_rgba_inputs(model):
    gray_face = toy.astronaut_face().mean(-1, keepdims=True).repeat(3, -1).astype(np.uint8)
    img, box = one_face(texture=gray_face)
    assert (img[..., 0] == img[..., 1]).all()  # a gray photo in RGB
    reference = fa.encode_identity(model, as_image(img)).identity.faces[0]
    gray = torch.from_numpy(img[..., 0]).float() / 255.0
    rgba = torch.cat([as_image(img), torch.rand(1, *img.shape[:2], 1)], dim=-1)
    for variant in (gray[None, :, :, None], gray[None], gray, rgba, as_image(img)[0], as_image(img).double()):
        got = fa.encode_identity(model, variant).identity.faces[0]
        torch.testing.assert_close(got.embedding, reference.embedding)
        torch.testing.assert_close(got.bbox, reference.bbox)
    # a colour photo converted to gray by another node still has its face found
    colour, box = one_face()
    g = torch.from_numpy(colour).float().mean(-1) / 255.0
    got = fa.encode_identity(model, g[None, :, :, None]).identity.faces[0]
    np.testing.assert_allclose(got.bbox.numpy(), box, atol=1e-3)


def test_flip_augmentation_adds_the_mirrored_face(model, pack_dir):
    import onnxruntime as ort

    img, box = one_face()
    faces = fa.encode_identity(model, as_image(img), flip=True).identity.faces
    assert [f.flipped for f in faces] == [False, True] and faces[1].image_index == 0
    original, mirrored = faces
    assert torch.equal(mirrored.crop, original.crop.flip(1))
    session = ort.InferenceSession(str(pack_dir / "w600k_r50.onnx"), providers=["CPUExecutionProvider"])
    crop = (mirrored.crop.numpy() * 255.0).round().astype(np.float32)
    by_hand = session.run(None, {"input.1": ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None]})[0][0]
    np.testing.assert_allclose(mirrored.embedding.numpy(), by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mirrored.embedding, original.embedding)
    width = img.shape[1]
    np.testing.assert_allclose(mirrored.bbox.numpy(), [width - box[2], box[1], width - box[0], box[3]], atol=1e-3)
    kps = original.landmarks.numpy()
    np.testing.assert_allclose(mirrored.landmarks.numpy()[0], [width - kps[1, 0], kps[1, 1]], atol=1e-3)  # eyes swap sides
    np.testing.assert_allclose(mirrored.landmarks.numpy()[3], [width - kps[4, 0], kps[4, 1]], atol=1e-3)


def test_missing_pack_folder_lists_folders_searched_and_files_expected(tmp_path):
    roots = [tmp_path / "a" / "insightface", tmp_path / "b" / "insightface"]
    with pytest.raises(fa.FaceAnalysisError) as err:
        fa.find_face_pack("antelopev2", roots)
    text = str(err.value)
    for root in roots:
        assert str(root / "models" / "antelopev2") in text
    for name in ("det_10g.onnx", "scrfd_10g_bnkps.onnx", "w600k_r50.onnx", "glintr100.onnx", "models/insightface/models/"):
        assert name in text
    assert "no packs are present" in text and err.value.input_name == "pack"


def test_pack_listing_and_a_zip_unpacked_twice(tmp_path, pack_dir):
    root = tmp_path / "insightface"
    toy.copy_pack(pack_dir, root / "models" / "antelopev2" / "antelopev2")  # what unzipping into a folder of that name gives
    toy.copy_pack(pack_dir, root / "buffalo_l")  # a pack put directly under insightface/
    (root / "models" / "empty").mkdir()
    assert fa.list_face_packs([root, tmp_path / "missing"]) == ["antelopev2", "buffalo_l"]
    assert fa.find_face_pack("antelopev2", [root]) == root / "models" / "antelopev2" / "antelopev2"
    loaded = fa.load_face_analysis(fa.find_face_pack("buffalo_l", [root]), "CPU", 640, name="buffalo_l")
    assert loaded.name == "buffalo_l"
    with pytest.raises(fa.FaceAnalysisError, match="packs present: antelopev2, buffalo_l"):
        fa.find_face_pack("empty", [root])


def test_onnx_files_that_are_not_face_models(tmp_path, pack_dir):
    only_junk = tmp_path / "junk"
    only_junk.mkdir()
    toy.build_non_face(only_junk / "model.onnx")
    (only_junk / "broken.onnx").write_bytes(b"this is not an onnx file" * 10)
    with pytest.raises(fa.FaceAnalysisError) as err:
        fa.load_face_analysis(only_junk, "CPU")
    text = str(err.value)
    assert "so it has no face detector and no face recognizer" in text
    assert "model.onnx: not a face model (input 1x10; 1 output(s) 1x10)" in text
    assert "broken.onnx is incomplete or corrupt: it does not parse as an ONNX model" in text
    assert "delete broken.onnx and download the pack again" in err.value.fix  # not a manifest file: no download id

    no_recognizer = tmp_path / "half"
    no_recognizer.mkdir()
    (no_recognizer / "det_10g.onnx").write_bytes((pack_dir / "det_10g.onnx").read_bytes())
    toy.build_non_face(no_recognizer / "w600k_r50.onnx")
    with pytest.raises(fa.FaceAnalysisError, match=r"has no face recognizer; files: w600k_r50.onnx: not a face model"):
        fa.load_face_analysis(no_recognizer, "CPU")

    classifier = tmp_path / "classifier"  # square 112 input, one output: routed as recognition by shape alone
    classifier.mkdir()
    (classifier / "det_10g.onnx").write_bytes((pack_dir / "det_10g.onnx").read_bytes())
    toy.build_recognizer(classifier / "imagenet.onnx", width=1000)
    with pytest.raises(fa.FaceAnalysisError, match="outputs 1000 values per image, not a face embedding"):
        fa.load_face_analysis(classifier, "CPU")


def test_auxiliary_models_are_skipped_and_batch_one_recognizers_work(tmp_path, pack_dir):
    folder = tmp_path / "antelopev2"
    folder.mkdir()
    (folder / "scrfd_10g_bnkps.onnx").write_bytes((pack_dir / "det_10g.onnx").read_bytes())
    toy.build_recognizer(folder / "glintr100.onnx", batch=1)  # exported with a fixed batch of 1
    (folder / "1k3d68.onnx").write_bytes(b"not even read")
    m = fa.load_face_analysis(folder, "CPU", 640)
    assert (m.detector_file, m.recognizer_file) == ("scrfd_10g_bnkps.onnx", "glintr100.onnx")
    img, _ = one_face()
    assert fa.encode_identity(m, as_image(img), flip=True).identity.count == 2


def test_insightface_model_package_manifest(tmp_path, pack_dir):
    folder = tmp_path / "raccoon_toy"
    folder.mkdir()
    (folder / "detector.onnx").write_bytes((pack_dir / "det_10g.onnx").read_bytes())
    (folder / "recognizer.onnx").write_bytes((pack_dir / "w600k_r50.onnx").read_bytes())
    (folder / "MODEL.LICENSE").write_text("test models\n")
    (folder / "manifest.json").write_text(json.dumps({
        "manifest_version": 2, "model_id": "raccoon_toy", "license": "MODEL.LICENSE",
        "tasks": {"detection": {"file": "detector.onnx"}, "recognition": {"file": "recognizer.onnx"}}}))
    m = fa.load_face_analysis(folder, "CPU", 640)
    assert (m.detector_file, m.recognizer_file) == ("detector.onnx", "recognizer.onnx")
    img, box = one_face()
    np.testing.assert_allclose(fa.encode_identity(m, as_image(img)).identity.faces[0].bbox.numpy(), box, atol=1e-3)


def test_providers_and_det_size(pack_dir):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(fa.FaceAnalysisError) as err:
            fa.load_face_analysis(pack_dir, "CUDA")
        assert "no CUDA provider" in str(err.value) and "onnxruntime-gpu" in err.value.fix
        assert fa.load_face_analysis(pack_dir, "auto").provider == "CPU"
    else:  # a GPU machine: auto picks CUDA
        assert fa.load_face_analysis(pack_dir, "auto").provider == "CUDA"
    with pytest.raises(fa.FaceAnalysisError, match="multiple of 32"):
        fa.load_face_analysis(pack_dir, "CPU", det_size=600)
    m = fa.load_face_analysis(pack_dir, "CPU", det_size=320)
    assert m.retry_sizes() == [320, 256, 192, 128] and m.retry_sizes(False) == [320]


# --------------------------------------------------------------------------------------------- missing packages


@pytest.mark.parametrize("module, package", [("insightface", "insightface"), ("onnxruntime", "onnxruntime"), ("cv2", "opencv-python-headless")])
def test_missing_package_reports_the_pip_command(monkeypatch, pack_dir, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    with pytest.raises(fa.FaceDependencyError) as err:
        fa.load_face_analysis(pack_dir, "CPU")
    assert err.value.package == package
    command = err.value.pip_command
    assert sys.executable in command and " -m pip install " in command
    command = command.replace("'", '"')  # install.py quotes for the shell it runs in (POSIX: single quotes)
    if module == "insightface":
        assert '--no-deps "insightface>=2.1"' in command
    if module == "onnxruntime":
        assert '"onnxruntime>=1.17"' in command or '"onnxruntime-gpu>=1.17"' in command
    if module == "cv2":
        assert '"opencv-python-headless>=4.8"' in command
    if module != "onnxruntime":  # the installed onnxruntime is left alone
        assert "onnxruntime" not in command


def test_a_missing_insightface_dependency_is_named(monkeypatch, pack_dir):
    saved = {name: mod for name, mod in sys.modules.items() if name == "insightface" or name.startswith("insightface.")}
    try:
        for name in saved:
            del sys.modules[name]
        monkeypatch.setitem(sys.modules, "skimage", None)
        with pytest.raises(fa.FaceDependencyError) as err:
            fa.load_face_analysis(pack_dir, "CPU")
    finally:  # put the original insightface modules back, drop the half-imported ones
        for name in [n for n in sys.modules if n == "insightface" or n.startswith("insightface.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    assert err.value.package.startswith("scikit-image") and "pip install scikit-image" in err.value.pip_command


# --------------------------------------------------------------------------------------------- similarity


def test_identity_similarity(model, tmp_path):
    img, _ = one_face(texture=toy.astronaut_face(), size=16, x=320, y=224)
    identity = fa.encode_images(model, as_image(img))
    other, _ = one_face(texture=toy.noise_texture(7), x=128, y=64)
    both = toy.blank(480, 640)
    toy.plant(both, 64, 64, 32, toy.noise_texture(7))
    toy.plant(both, 480, 320, 16, toy.astronaut_face())  # the identity's face, smaller
    result = fa.identity_similarity(model, identity, [as_image(img), as_image(other), as_image(toy.blank(96, 96)), as_image(both)])
    same, different, none, largest = result.scores
    assert same == pytest.approx(1.0, abs=1e-6)
    expected = float(torch.nn.functional.cosine_similarity(
        fa.encode_images(model, as_image(other)).embeddings[0].double(), identity.embeddings[0].double(), dim=0))
    assert different == pytest.approx(expected, abs=1e-6) and different < 0.999
    assert none is None and result.chosen[2] is None
    assert result.chosen[3].bbox.tolist() == [64, 64, 96, 96]  # largest
    best = fa.identity_similarity(model, identity, as_image(both), face="best match")
    assert best.chosen[0].bbox.tolist() == [480, 320, 496, 336] and best.scores[0] == pytest.approx(1.0, abs=1e-5)
    assert largest < 0.999

    other_width = tmp_path / "small"
    other_width.mkdir()
    (other_width / "det_10g.onnx").write_bytes((toy.toy_pack() / "det_10g.onnx").read_bytes())
    toy.build_recognizer(other_width / "w600k_mbf.onnx", width=256)
    with pytest.raises(fa.FaceAnalysisError, match="made with a 512-value recognizer"):
        fa.identity_similarity(fa.load_face_analysis(other_width, "CPU"), identity, as_image(img))
