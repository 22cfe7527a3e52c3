"""The trainer's condition dropout, FACT's paired/shuffled faces, per-target learning rates and the prepare command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import training_data_fixtures as tdf
from conftest import pack
from training_fixtures import tiny_pva_adapter

cd = pack("adapters.training.condition_dropout")
trainer_mod = pack("nodes.training.trainer")
native = pack("adapters.formats.native_format")


def test_dropout_draw_is_ip_adapters_rule():
    rule = cd.ConditionDropout(0.1, 0.2, 0.3)
    ids, texts = rule.draw(1000, torch.Generator().manual_seed(4))
    u = torch.rand(1000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for x, i, t in zip(u.tolist(), ids.tolist(), texts.tolist()):
        expected = (x < 0.1 or 0.3 <= x < 0.6, 0.1 <= x < 0.3 or 0.3 <= x < 0.6)
        assert (i, t) == expected
    assert cd.ConditionDropout.from_config(None) == cd.ConditionDropout(0.05, 0.05, 0.05)
    assert cd.ConditionDropout.from_config(0) == cd.ConditionDropout(0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        cd.ConditionDropout.from_config({"image": 0.1})
    assert cd.shuffle_probability(0, 11) == 0.0 and cd.shuffle_probability(5, 11) == pytest.approx(0.25) and cd.shuffle_probability(10, 11) == 0.5


@pytest.fixture(scope="module")
def models():
    return tdf.tiny_models("sd15", 0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tdf.make_folder(tmp_path_factory.mktemp("cond") / "data")


def make_trainer(tmp_path, folder, models, targets, caption="a photo of a person", **train):
    cfg = {
        "data": {"folder": str(folder), "resolution": 64, "caption": caption, "max_references": 2},
        "targets": targets,
        "train": {"steps": 4, "batch_size": 4, "grad_accum": 1, "log_every": 1, "checkpoint_every": 0, **train},
        "output": {"dir": str(tmp_path / "out"), "name": "x"},
    }
    return trainer_mod.Trainer(cfg, models, config_dir=str(tmp_path))


def test_dropout_reaches_the_micro_batch(tmp_path, folder, models):
    pva = {"pva": {"train_projector": True, "tokens": 2, "layers": 1, "ff_dim": 32}}
    t = make_trainer(tmp_path, folder, models, pva, condition_dropout={"identity": 0.0, "text": 1.0, "both": 0.0})
    try:
        mb = t._micro_batch(0, 0)
        assert mb.captions == [""] * 8 and not mb.text_kept.any()
        assert all(float(f.arcface.abs().sum()) > 0 for f in mb.features)
    finally:
        t.close()
    t = make_trainer(tmp_path, folder, models, pva, condition_dropout={"identity": 1.0, "text": 0.0, "both": 0.0})
    try:
        mb = t._micro_batch(0, 0)
        assert all(c for c in mb.captions) and mb.text_kept.all()
        assert all(float(f.arcface.abs().sum()) == 0 and float(f.arcface_normed.abs().sum()) == 0 for f in mb.features)
        t.train(until=1, progress=False)  # a dropped identity still trains (zeros through the projector)
    finally:
        t.close()


def test_face_adapter_paired_and_shuffled_faces(tmp_path, folder, models):
    path = tmp_path / "faces.safetensors"
    native.write_native(tiny_pva_adapter(models[0], seed=7), str(path))
    for shuffle, own in ((0.0, True), (1.0, False)):
        t = make_trainer(tmp_path, folder, models, {"face_adapter": {"adapter": str(path), "shuffle_start": shuffle, "shuffle_end": shuffle}}, condition_dropout=0)
        try:
            batch = tdf_batch(t)
            t._drop_conditions(batch, 0, 0)
            for feats, own_feats, p in zip(batch["features"], batch["own_features"], batch["paths"]):
                same = torch.equal(feats["arcface"], own_feats["arcface"])
                alone = len(t.dataset.index.groups[t.dataset.index.entries[[e.path for e in t.dataset.index.entries].index(p)].identity]) == 1
                assert same == (own or alone), p
        finally:
            t.close()


def tdf_batch(trainer):
    collate = pack("adapters.training.training_data").collate
    return collate([trainer.dataset.sample(trainer.dataset.position(k)) for k in range(4)])


def test_learning_rate_defaults_by_kind_of_parameter(tmp_path, folder, models):
    targets = {"stage_tokens": {"stages": 2, "attention_weight": 0.0}, "router": {"hidden": 8}}
    t = make_trainer(tmp_path, folder, models, targets, caption="a photo of a <new1> person", batch_size=1)
    try:
        assert t.learning_rates == {"stage_tokens": pytest.approx(1e-3), "router": pytest.approx(1e-4)}
        assert {g["name"]: g["lr"] for g in t.optimizer.param_groups} == {"stage_tokens": pytest.approx(1e-3), "router": pytest.approx(1e-4)}
    finally:
        t.close()
    targets = {"kv_mixed": {"tokens": 1, "value_bottleneck": 8}, "router": {"hidden": 8, "learning_rate": 3e-4}}
    t = make_trainer(tmp_path, folder, models, targets, batch_size=2)  # scaled by the batch (PVA's convention)
    try:
        lrs = {g["name"]: g["lr"] for g in t.optimizer.param_groups}
        assert lrs == {"kv_mixed.projections": pytest.approx(2e-5), "kv_mixed.encoders": pytest.approx(1e-4), "router": pytest.approx(6e-4)}
    finally:
        t.close()


def test_prepare_caches_identity_features(tmp_path):
    import toy_faces as toy
    from PIL import Image

    fa = pack("adapters.faces.face_analysis")
    prep = pack("nodes.identity.prepare_features")
    model = fa.load_face_analysis(toy.toy_pack(), "CPU", 640)
    root = tmp_path / "faces"
    (root / "anna").mkdir(parents=True)
    img = toy.blank(480, 640)
    toy.plant(img, 64, 64, 32, toy.astronaut_face())
    Image.fromarray(img).save(root / "anna" / "0.png")
    Image.fromarray(toy.blank(480, 640)).save(root / "anna" / "empty.png")
    report = prep.prepare_folder(str(root), model)
    assert [p.split("/")[-1] for p in report.written] == ["0.id.safetensors"] and [p.split("/")[-1] for p in report.no_face] == ["empty.png"]
    stored = load_file(str(root / "anna" / "0.id.safetensors"))
    direct = fa.encode_identity(model, [np.asarray(Image.open(root / "anna" / "0.png").convert("RGB"))]).identity.faces[0].embedding
    assert set(stored) == {"arcface"} and torch.equal(stored["arcface"], direct)
    again = prep.prepare_folder(str(root), model)
    assert again.skipped == [str(root / "anna" / "0.png")] and not again.written
    # the trainer's data stream reads them (no face analysis at training time)
    data = pack("adapters.training.training_data")
    stream = data.StreamingImages(data.ImageFolderIndex(str(root)), 32, need_own_features=True)
    assert torch.equal(stream.features_of(0)["arcface"][0], direct)
