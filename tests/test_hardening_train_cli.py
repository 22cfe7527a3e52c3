"""The command-line trainer refuses bad configs and runs that cannot fit, before any work (issue 21, classes 1 and 6).

Config values: every number finite, a real number (not ``true``), in range; ``data.folder`` a folder
with images; one :class:`TrainingConfigError` each, naming the setting. Memory: the trainer reuses
Personalize identity's estimate (``nodes/personalization.check_training_memory``) for its
micro-batch and refuses with the resolution that fits, before the data stream or the optimizer exist.
"""

from __future__ import annotations

import json

import pytest

import training_data_fixtures as tdf
from conftest import pack

checks = pack("adapters.training.training_config_checks")
trainer_mod = pack("nodes.training.trainer")
TrainingConfigError = checks.TrainingConfigError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tdf.make_folder(tmp_path_factory.mktemp("train") / "data")


def _config(folder, **changes):
    cfg = {
        "models": {"factory": "training_data_fixtures:tiny_models"},
        "data": {"folder": str(folder), "resolution": 64, "caption": "photo of a <new1> person", "max_references": 2},
        "targets": {"pva": {"train_projector": True, "tokens": 4, "layers": 1, "ff_dim": 64}},
        "train": {"steps": 1, "batch_size": 1, "grad_accum": 1, "learning_rate": 1e-4, "log_every": 1, "checkpoint_every": 0},
        "output": {"dir": "out", "name": "pva"},
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    return cfg


BAD_VALUES = {
    "train__learning_rate": [float("nan"), float("inf"), -1e-4, 0, 2.0, "1e-4", True],
    "train__steps": [0, -5, 1.5, float("nan"), True, "100", 10**9],
    "train__batch_size": [0, 2000, float("inf"), "2"],
    "train__grad_accum": [0, -1, 1e9],
    "train__time_resample": [0, 100],
    "train__weight_decay": [float("nan"), -0.1, 5],
    "train__background_weight": [float("-inf"), 2],
    "train__seed": [-1, 0.5],
    "train__checkpoint_every": [-1, float("nan")],
    "data__resolution": [0, 32, 100, 8192, float("nan"), 512.5],
    "data__max_references": [0, 1000],
}
CASES = [(k, v) for k, vs in BAD_VALUES.items() for v in vs]


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_each_bad_value_is_one_clear_error_naming_the_setting(folder, key, value):
    with pytest.raises(TrainingConfigError) as info:
        checks.check_training_config(_config(folder, **{key: value}))
    setting = key.replace("__", ".")
    assert info.value.setting == setting and str(info.value).startswith(setting + ":") and "Fix:" in str(info.value)


@pytest.mark.parametrize("case", ["missing", "empty string", "not a folder", "empty folder", "only sidecars", "NUL"])
def test_data_folder_must_exist_and_hold_images(tmp_path, folder, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file.txt").write_text("x")
    side = tmp_path / "side"
    side.mkdir()
    (side / "a.id.safetensors").write_bytes(b"x")
    (side / "notes.txt").write_text("x")
    value = {"missing": None, "empty string": " ", "not a folder": str(tmp_path / "file.txt"), "empty folder": str(empty),
             "only sidecars": str(side), "NUL": "a\x00b"}[case]
    cfg = _config(folder, data__folder=value)
    if value is None:
        del cfg["data"]["folder"]
    with pytest.raises(TrainingConfigError) as info:
        checks.check_training_config(cfg, str(tmp_path))
    assert info.value.setting == "data.folder"


@pytest.mark.parametrize("config,setting", [
    ([1, 2], "config"), ({"targets": {"pva": {}}}, "models"), ({"models": {"checkpoint": "x"}}, "targets"),
    ({"models": {"checkpoint": "x"}, "targets": {"pva": {}}, "train": [1]}, "train"),
])
def test_config_shape_errors(config, setting):
    with pytest.raises(TrainingConfigError) as info:
        checks.check_training_config(config)
    assert info.value.setting == setting


@pytest.mark.parametrize("key,value", [("data__caption", ""), ("data__caption", 5), ("train__gradient_checkpointing", "yes")])
def test_caption_and_checkpointing_values(folder, key, value):
    with pytest.raises(TrainingConfigError, match=key.replace("__", ".")):
        checks.check_training_config(_config(folder, **{key: value}))


def test_a_good_config_passes(folder):
    checks.check_training_config(_config(folder))
    checks.check_training_config(_config(folder, train__learning_rate=None, train__gradient_checkpointing="auto", data__resolution=1024))


@pytest.mark.parametrize("text", ["{", "not json", '{"a": 1e99999}x', "\xff"])
def test_unreadable_config_file_is_one_error_before_models_load(tmp_path, text, monkeypatch):
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode("latin-1"))
    monkeypatch.setattr(trainer_mod, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    with pytest.raises(TrainingConfigError) as info:
        trainer_mod.run(str(path))
    assert info.value.setting == "config"


def test_cli_prints_one_line_and_exits_2(tmp_path, folder, monkeypatch, capsys):
    path = tdf.write_config(tmp_path / "c.json", **_config(folder, train__learning_rate=float("nan")))
    monkeypatch.setattr(trainer_mod, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    assert trainer_mod.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("resolution,fits", [(1024, 512), (512, 256), (2048, 128)])
def test_a_cli_run_that_cannot_fit_is_refused_before_work_with_the_resolution_that_fits(tmp_path, folder, monkeypatch, resolution, fits):
    import comfy.model_management as mm

    pers = pack("nodes.training.personalization")
    models = tdf.tiny_models("sd15", 0)
    model = models[0]
    micro = 1 * 2  # batch_size x time_resample
    budget = pers.training_bytes(model, micro, (fits // 8, fits // 8), False) + int(model.model_size())
    monkeypatch.setattr(mm, "get_total_memory", lambda *a, **k: budget)
    monkeypatch.setattr(trainer_mod, "StreamingImages", lambda *a, **k: pytest.fail("data opened before the memory check"))
    cfg = _config(folder, data__resolution=resolution, train__time_resample=2, train__gradient_checkpointing=False)
    path = tdf.write_config(tmp_path / "big.json", **cfg)
    with pytest.raises(TrainingConfigError) as info:
        trainer_mod.run(str(path), models=models)
    text = str(info.value)
    assert info.value.setting == "data.resolution" and f'"resolution": {fits}' in text and f"{resolution} px" in text, text
    json.loads("{" + text.split("{", 1)[1].split("}", 1)[0] + "}")  # the fix is a config line that parses


@pytest.mark.parametrize("where,value", [
    ("targets.pva.token_lr", float("nan")), ("targets.pva.loss_weight", float("inf")), ("targets.router.hidden", float("-inf")),
    ("train.condition_dropout.identity", float("nan")), ("output.scale", float("inf")),
])
def test_every_number_anywhere_in_the_config_must_be_finite(folder, where, value):
    cfg = _config(folder)
    section, *rest = where.split(".")
    node = cfg.setdefault(section, {})
    for key in rest[:-1]:
        node = node.setdefault(key, {})
    node[rest[-1]] = value
    with pytest.raises(TrainingConfigError) as info:
        checks.check_training_config(cfg)
    assert info.value.setting == where and "finite" in str(info.value)


def test_nan_written_in_json_is_refused_before_models_load(tmp_path, folder, monkeypatch):
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(_config(folder)).replace('"token_lr"', '"x"').replace('"tokens": 4', '"tokens": 4, "token_lr": NaN'))
    monkeypatch.setattr(trainer_mod, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    with pytest.raises(TrainingConfigError, match="targets.pva.token_lr"):
        trainer_mod.run(str(path))


@pytest.mark.parametrize("line", ["{not json", "[" * 100_000, '{"caption": "no file"}', "[1, 2]", '{"file": 5}', "9" * 5000, "\xff\xfe"])
def test_bad_metadata_lines_are_one_error_naming_the_line(tmp_path, line):
    data = pack("adapters.training.training_data")
    folder = tdf.make_folder(tmp_path / "data")
    (folder / "metadata.jsonl").write_bytes(b'{"file": "x.png", "caption": "ok"}\n' + line.encode("latin-1") + b"\n")
    with pytest.raises(TrainingConfigError) as info:
        data.ImageFolderIndex(str(folder))
    assert info.value.setting == "data.folder" and "line 2" in str(info.value)


def test_oversized_metadata_file_is_refused_unread(tmp_path, monkeypatch):
    data = pack("adapters.training.training_data")
    folder = tdf.make_folder(tmp_path / "data")
    (folder / "metadata.jsonl").write_text('{"file": "x.png"}\n' * 100)
    monkeypatch.setattr(data, "MAX_METADATA_BYTES", 100)
    with pytest.raises(TrainingConfigError, match="over 100"):
        data.ImageFolderIndex(str(folder))
