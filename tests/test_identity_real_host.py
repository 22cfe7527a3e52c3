"""Real faces through the real host: the pack's own nodes on real photos with a real detector and recognizer.

One prompt (built by :func:`real_prompt`, run once per module through /prompt) takes every
photo of ``harness/real_face_photos.py`` from the instance's ``input/`` with LoadImage, loads
the YuNet + SFace pack from ``models/insightface/models/yunet_sface`` with Load face analysis
model, and runs:

- Encode identity on each photo (and on each of the six faces of a group photo, by face_index):
  its IDENTITY reported through the test kit's Report node, its crops and masks saved;
- Identity similarity of each photo's identity against every later photo (an image list);
- Encode identity of three Obama photos fused into one identity, scored on the fourth, for
  each choice of the fourth (leave one out).

The tests then compare what the nodes returned with YuNet run by hand through OpenCV
(tests/real_faces.py) and with who is in each photo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import real_faces as rf
from harness import real_face_pack, real_face_photos
from harness.prompts import Graph

pytestmark = [pytest.mark.host, pytest.mark.slow]

PHOTOS = list(real_face_photos.PHOTOS)
GROUP = real_face_photos.MULTI_FACE.name
GROUP_FACES = 6
OBAMA = real_face_photos.people()["Barack Obama"]
MAX_SIDE = 900  # the larger face_recognition photos (up to 2333 px) are scaled down when copied into input/


@pytest.fixture(scope="module")
def real_instance(instance):
    """The pack linked into the server's models/insightface/models/, the photos copied into its input/ (at most 900 px)."""
    rf.require(real_face_pack.install_pack, instance.models / "insightface")
    rf.require(real_face_photos.copy_into, instance.input, None, MAX_SIDE)
    return instance


def stem(name: str) -> str:
    return Path(name).stem


def real_prompt():
    """The prompt (see the module docstring) and ``{what: node id}`` of the nodes whose outputs the tests read."""
    g = Graph()
    ids = {}
    face_analysis = g.out(g.add("IdentityAttentionLoadFaceAnalysis", pack=real_face_pack.PACK_NAME, provider="CPU", det_size=640))
    loaded = {name: g.out(g.add("LoadImage", image=name)) for name in PHOTOS + [GROUP]}

    def encode(key, images, face="largest", face_index=0):
        node = g.add("IdentityAttentionEncodeIdentity", face_analysis=face_analysis, images=images, face=face, face_index=face_index,
                     retry_smaller_sizes=True, flip_augment=False, mask_grow=1.0, mask_feather=0.0)
        ids[f"identity:{key}"] = g.add("IdentityAttentionTestKit_Report", label=f"identity:{key}", identity=g.out(node, 0))
        ids[f"crops:{key}"] = g.add("SaveImage", images=g.out(node, 1), filename_prefix=f"realfaces/crop_{key}")
        masks = g.add("MaskToImage", mask=g.out(node, 2))
        ids[f"mask:{key}"] = g.add("SaveImage", images=g.out(masks), filename_prefix=f"realfaces/mask_{key}")
        return g.out(node, 0)

    def image_list(names):
        return g.out(g.add("IdentityAttentionTestKit_ImageList", **{f"image_{i + 1}": loaded[n] for i, n in enumerate(names)}))

    def similarity(key, identity, images):
        node = g.add("IdentityAttentionIdentitySimilarity", images=images, identity=identity, face_analysis=face_analysis, face="largest")
        ids[f"similarity:{key}"] = g.add("IdentityAttentionTestKit_Report", label=f"similarity:{key}", floats=g.out(node, 0))

    identities = {name: encode(stem(name), loaded[name]) for name in PHOTOS}
    for index in range(GROUP_FACES):
        encode(f"group{index}", loaded[GROUP], face="index", face_index=index)
    for i, name in enumerate(PHOTOS[:-1]):  # the upper triangle: sim(a, b) = sim(b, a) with one detector and recognizer
        similarity(stem(name), identities[name], image_list(PHOTOS[i + 1:]))
    for held_out in OBAMA:
        fused = g.add("IdentityAttentionEncodeIdentity", face_analysis=face_analysis, images=image_list([n for n in OBAMA if n != held_out]),
                      face="largest", face_index=0, retry_smaller_sizes=True, flip_augment=False, mask_grow=1.2, mask_feather=0.25)
        ids[f"identity:fused_{stem(held_out)}"] = g.add("IdentityAttentionTestKit_Report", label=f"identity:fused_{stem(held_out)}",
                                                        identity=g.out(fused, 0))
        similarity(f"fused_{stem(held_out)}", g.out(fused, 0), loaded[held_out])
    return g.prompt(), ids


@pytest.fixture(scope="module")
def results(server, real_instance):
    """What the prompt's nodes returned: ``report(key)`` -> payload, ``files(key)`` -> saved images as arrays."""
    from PIL import Image

    prompt, ids = real_prompt()
    entry = server.run(prompt, timeout=300)

    class Results:
        @staticmethod
        def report(key):
            (payload,) = entry["outputs"][ids[key]]["report"]
            return payload

        @staticmethod
        def identity(key):
            (identity,) = Results.report(f"identity:{key}")["identities"]
            return identity

        @staticmethod
        def files(key):
            paths = server.output_files({"outputs": {ids[key]: entry["outputs"][ids[key]]}}, "images")
            return [np.asarray(Image.open(p).convert("RGB")) for p in paths]

    return Results


@pytest.fixture(scope="module")
def by_hand(real_instance):
    """YuNet run by hand on every photo: ``{name: {"letterboxed": faces, "natural": faces}}``."""
    out = {}
    for name in PHOTOS + [GROUP]:
        rgb = real_face_photos.read_rgb(real_instance.input / name)  # the file LoadImage reads
        out[name] = {"rgb": rgb, "letterboxed": rf.yunet_by_hand(rgb, True), "natural": rf.yunet_by_hand(rgb, False)}
    return out


def encoded_faces(results):
    """``[(photo name, key, the encoder's face record)]``: one per photo, six for the group photo."""
    rows = [(name, stem(name), results.identity(stem(name))["faces"]) for name in PHOTOS]
    rows += [(GROUP, f"group{i}", results.identity(f"group{i}")["faces"]) for i in range(GROUP_FACES)]
    for _, key, faces in rows:
        assert len(faces) == 1, f"{key}: one face per photo expected, got {len(faces)}"
    return [(name, key, faces[0]) for name, key, faces in rows]


def test_the_pack_is_offered_by_the_loader_node(server, real_instance):
    options = server.object_info()["IdentityAttentionLoadFaceAnalysis"]["input"]["required"]["pack"][0]
    assert real_face_pack.PACK_NAME in options


def test_the_encoder_finds_every_face_where_it_is(results, by_hand):
    for name, key, face in encoded_faces(results):
        hand = by_hand[name]
        assert face["image_size"] == list(hand["rgb"].shape[:2])
        box = np.array(face["bbox"])
        match = max(hand["letterboxed"], key=lambda f: rf.iou(f["box"], box))
        size = box[2] - box[0]
        # the same detector by hand on the same 640 x 640 input: the same face, box, landmarks and score
        # (the rewrite into the SCRFD layout is exact; measured: IoU > 0.99999, landmarks within 1e-6 of the box width)
        assert rf.iou(match["box"], box) > 0.999, (key, box, match["box"])
        assert np.abs(np.array(face["landmarks"]) - match["kps"]).max() < 1e-3 * size, key
        assert abs(face["det_score"] - match["score"]) < 1e-4, key
        # and OpenCV's YuNet at the photo's own resolution agrees on where the face is
        assert max(rf.iou(f["box"], box) for f in hand["natural"]) > 0.8, key
        if name != GROUP:  # "largest" chose the largest face the hand-run detector sees
            assert match is max(hand["letterboxed"], key=lambda f: rf.area(f["box"]))
    # the group photo: face_index 0..5 are the six faces the hand-run detector finds, left to right
    hand = sorted(by_hand[GROUP]["letterboxed"], key=lambda f: f["box"][0] + f["box"][2])
    assert len(hand) == GROUP_FACES
    for i, expected in enumerate(hand):
        assert rf.iou(results.identity(f"group{i}")["faces"][0]["bbox"], expected["box"]) > 0.999, i


def pairwise_scores(results):
    """``{(photo a, photo b): the Identity similarity node's score of b against a's identity}``, both orders."""
    scores = {}
    for i, name in enumerate(PHOTOS[:-1]):
        values = results.report(f"similarity:{stem(name)}")["floats"]
        assert len(values) == len(PHOTOS) - i - 1  # one score per image of the list, in order
        for other, value in zip(PHOTOS[i + 1:], values):
            scores[name, other] = scores[other, name] = value
    return scores


def test_identity_similarity_puts_every_same_person_pair_above_every_other_pair(results):
    scores = {pair: v for pair, v in pairwise_scores(results).items() if PHOTOS.index(pair[0]) < PHOTOS.index(pair[1])}
    person = {name: photo.person for name, photo in real_face_photos.PHOTOS.items()}
    same = {pair: v for pair, v in scores.items() if person[pair[0]] == person[pair[1]]}
    different = {pair: v for pair, v in scores.items() if person[pair[0]] != person[pair[1]]}
    assert len(same) == 8 and len(different) == 47  # Obama x4, Macron x2, Ardern x2; 11 photos of 6 people
    worst_same, best_other = min(same, key=same.get), max(different, key=different.get)
    # measured: worst same-person pair 0.62 (Macron 2014 / 2025), best different-people pair 0.31 (Obama / Biden)
    assert same[worst_same] > different[best_other] + 0.2, (worst_same, same[worst_same], best_other, different[best_other])
    # the node's score is the cosine of the two photos' embeddings in their IDENTITYs (no hidden re-weighting)
    embedding = {name: np.array(results.identity(stem(name))["faces"][0]["embedding"], np.float64) for name in PHOTOS}
    for (a, b), value in scores.items():
        ea, eb = embedding[a], embedding[b]
        assert value == pytest.approx(ea @ eb / np.linalg.norm(ea) / np.linalg.norm(eb), abs=1e-4), (a, b)


def test_fusing_references_of_one_person_beats_any_single_reference(results):
    """Leave one out over the four Obama photos: the other three fused vs each photo alone as the reference."""
    scores = pairwise_scores(results)
    fused = {}
    for held_out in OBAMA:
        assert len(results.identity(f"fused_{stem(held_out)}")["faces"]) == len(OBAMA) - 1
        (fused[held_out],) = results.report(f"similarity:fused_{stem(held_out)}")["floats"]
    single = {ref: np.mean([scores[ref, target] for target in OBAMA if target != ref]) for ref in OBAMA}
    # measured: fused 0.83 on average; the best single reference (obama.jpg) 0.79 on the other three
    assert np.mean(list(fused.values())) > max(single.values()) + 0.01, (fused, single)


def test_crops_and_masks_land_on_the_faces(results, by_hand):
    for name, key, face in encoded_faces(results):
        hand = by_hand[name]
        rgb, box, kps = hand["rgb"], np.array(face["bbox"]), np.array(face["landmarks"])
        truth = max(hand["letterboxed"], key=lambda f: rf.iou(f["box"], box))
        (mask,) = results.files(f"mask:{key}")
        assert mask.shape[:2] == rgb.shape[:2]
        # mask_grow 1, feather 0: an ellipse in the face box (turned with the eyes) -> its extent is the face
        assert rf.iou(rf.mask_box(mask[..., 0] / 255.0), truth["box"]) > 0.9, key
        ys, xs = np.nonzero(mask[..., 0] > 127)
        assert truth["box"][0] < xs.mean() < truth["box"][2] and truth["box"][1] < ys.mean() < truth["box"][3], key
        (crop,) = results.files(f"crops:{key}")
        # the crop is the photo aligned on the encoder's landmarks (RGB, not mirrored)...
        expected = rf.align_by_hand(rgb, kps)
        difference = np.abs(crop.astype(int) - expected.astype(int))
        assert crop.shape == (112, 112, 3) and difference.mean() < 0.05 and difference.max() <= 2, key
        # ...its square, mapped back into the photo, sits on the face the hand-run detector found...
        back = rf.crop_box_in_photo(kps)
        # (the ArcFace framing shows the whole face box plus a margin: the square is ~1.3-1.9 x the box's area)
        assert rf.overlap(truth["box"], back) > 0.85 and rf.area(back) < 2.5 * rf.area(truth["box"]), (key, back, truth["box"])
        centre = (back[:2] + back[2:]) / 2
        assert truth["box"][0] < centre[0] < truth["box"][2] and truth["box"][1] < centre[1] < truth["box"][3], key
        # ...and looks like the crop aligned on the hand-run landmarks
        assert rf.ncc(crop, rf.align_by_hand(rgb, truth["kps"])) > 0.95, key
