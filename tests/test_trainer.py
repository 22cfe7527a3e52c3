"""The command-line trainer: streaming data, exact resume, exports that load, MoA routers, torchrun with 2 CPU ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import training_data_fixtures as tdf
from conftest import REPO, TESTS, pack
from training_fixtures import fixed_batch, identity, tiny_pva_adapter, x0_prediction

trainer_mod = pack("nodes.training.trainer")
data_mod = pack("adapters.training.training_data")
native = pack("adapters.formats.native_format")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tdf.make_folder(tmp_path_factory.mktemp("train") / "data")


@pytest.fixture(scope="module")
def models():
    return tdf.tiny_models("sd15", 0)


def pva_config(tmp_path, folder, steps=4, out="out", **train):
    return tdf.write_config(
        tmp_path / f"{out}.json",
        models={"factory": "training_data_fixtures:tiny_models"},
        data={"folder": str(folder), "resolution": 64, "caption": "photo of a <new1> person", "max_references": 2},
        targets={"pva": {"train_projector": True, "tokens": 4, "layers": 1, "ff_dim": 64, "token_lr": 1e-2}},
        train={"steps": steps, "batch_size": 2, "grad_accum": 2, "learning_rate": 1e-4, "log_every": 1, "checkpoint_every": 0, **train},
        output={"dir": str(tmp_path / out), "name": "pva"},
    )


def test_stream_reads_lazily_is_a_function_of_position_and_ranks_do_not_overlap(folder, monkeypatch):
    opened = []
    real = data_mod.load_image
    monkeypatch.setattr(data_mod, "load_image", lambda path, res: opened.append(path) or real(path, res))
    index = data_mod.ImageFolderIndex(str(folder))
    assert len(index) == 5 and set(index.groups) == {"person0", "person1", "loner"} and not opened
    a = data_mod.StreamingImages(index, 32, seed=3, rank=0, world=2, caption="x", need_features=True, max_references=2)
    b = data_mod.StreamingImages(index, 32, seed=3, rank=1, world=2, caption="x")
    first = [next(iter(a)) for _ in range(1)][0]
    assert len(opened) == 1  # one photo decoded for one sample
    positions_a = [a.position(k) for k in range(6)]
    positions_b = [b.position(k) for k in range(6)]
    assert not set(positions_a) & set(positions_b)
    again = data_mod.StreamingImages(index, 32, seed=3, rank=0, world=2, caption="x", need_features=True, max_references=2).sample(first.position)
    assert torch.equal(again.image, first.image) and again.path == first.path
    assert all(torch.equal(again.features[k], first.features[k]) for k in first.features)
    epoch = sorted(int(a.permutation(0)[i]) for i in range(5))
    assert epoch == list(range(5))  # every photo once per epoch
    captions = {os.path.basename(os.path.dirname(s.path)) + "/" + os.path.basename(s.path): s.caption for s in (a.sample(p) for p in range(5))}
    assert captions["person0/0.png"] == "a close-up photo of a person" and captions["person1/1.png"] == "x"
    assert first.mask is not None and first.mask.shape == (32, 32)


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, folder, models):
    whole = trainer_mod.run(str(pva_config(tmp_path, folder, out="whole")), models=models)
    cfg = pva_config(tmp_path, folder, out="parts")
    first = trainer_mod.run(str(cfg), stop_at=2, models=models)
    assert first.step == 2 and os.path.isfile(tmp_path / "parts" / "checkpoints" / "step_0000002.pt")
    second = trainer_mod.run(str(cfg), resume=str(tmp_path / "parts"), models=models)
    assert second.step == 4
    assert second.history == whole.history
    a = load_file(str(tmp_path / "whole" / "pva.safetensors"))
    b = load_file(str(tmp_path / "parts" / "pva.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert os.path.isfile(tmp_path / "whole" / "loss.png") and os.path.isfile(tmp_path / "whole" / "pva_token.safetensors")
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["steps"] == 4 and "pva.safetensors" in summary["files"]


def test_exported_pva_weights_load_through_the_weights_loader_and_patch_a_model(tmp_path, folder, models):
    trainer_mod.run(str(pva_config(tmp_path, folder, steps=1, out="export")), models=models)
    path = tmp_path / "export" / "pva.safetensors"
    loaded = native.read_native(str(path))  # as 'Load identity adapter' reads a native file
    read = pack("adapters.weights.safe_load").read_weight_file(str(path))
    converted = pack("adapters.formats.weight_formats").convert(read.tensors, read.metadata)
    assert converted.mechanism == loaded.mechanism == "joint" and type(converted.projector).__name__ == "PVATransformNetwork"
    from training_fixtures import inference_models

    model, clip, vae = inference_models("sd15", seed=0)
    pack("adapters.formats.weight_formats").check_against_model(converted, pack("nodes.common.host").cross_attention_layers(model))
    ApplyParallelAttention = pack("nodes.pva.parallel_attention_nodes").ApplyParallelAttention
    with torch.inference_mode():
        patched = ApplyParallelAttention().apply(model, converted, identity(2), 1.0, 0.0, 1.0, "both", "auto", "adapter", "per_reference")[0]
    x0, sigma, eps = fixed_batch(model, vae)
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(x0_prediction(patched, x0, sigma, eps, context), x0_prediction(model, x0, sigma, eps, context))


def test_moa_router_trains_with_its_router_loss_and_plugs_into_the_moa_node(tmp_path, folder, models):
    from training_fixtures import inference_models

    adapter_path = tmp_path / "branch.safetensors"
    native.write_native(tiny_pva_adapter(models[0], seed=5), str(adapter_path))
    cfg = tdf.write_config(
        tmp_path / "router.json",
        models={"factory": "training_data_fixtures:tiny_models"},
        data={"folder": str(folder), "resolution": 64, "caption": "a photo of a person"},
        targets={"router": {"adapter": str(adapter_path), "hidden": 16, "loss_weight": 1.0}},
        train={"steps": 2, "batch_size": 1, "grad_accum": 1, "learning_rate": 1e-3, "log_every": 1, "checkpoint_every": 0},
        output={"dir": str(tmp_path / "router"), "name": "routers"},
    )
    run = trainer_mod.run(str(cfg), models=models)
    assert set(run.history) == {"loss", "denoise", "router"} and all(v > 0 for v in run.history["router"])
    routers = native.read_native(str(tmp_path / "router" / "routers.safetensors"))
    assert routers.mechanism == "moa_router" and len(routers.layers) == 16
    assert set(next(iter(routers.layers.values()))) == {"router.0.weight", "router.0.bias", "router.2.weight", "router.2.bias"}
    model, clip, vae = inference_models("sd15", seed=0)
    ApplyParallelAttention = pack("nodes.pva.parallel_attention_nodes").ApplyParallelAttention
    ApplyMoA = pack("nodes.moa.mixture_of_attention_nodes").ApplyMixtureOfAttention
    branch = native.read_native(str(adapter_path))
    with torch.inference_mode():
        personalized = ApplyParallelAttention().apply(model, branch, identity(2), 1.0, 0.0, 1.0, "both", "joint", "adapter", "fused")[0]
        routed = ApplyMoA().apply(personalized, "learned", 1.0, 0.0, 1.0, "both", 1.0, False, router_weights=routers)[0]
    x0, sigma, eps = fixed_batch(model, vae)
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(x0_prediction(routed, x0, sigma, eps, context), x0_prediction(personalized, x0, sigma, eps, context))


def test_progress_line_and_loss_plot():
    line = trainer_mod.ProgressLine(100, start=0)
    line.t0 -= 10.0
    text = line.text(10, {"loss": 0.5})
    assert text.startswith("step 10/100 | loss 0.5000 | 1.00 s/step | ETA 1m 30s")
    plot = pack("adapters.training.loss_plot")
    img = plot.draw_loss_curves({"loss": [1.0, 0.8, 0.9, 0.5], "router": [0.1, 0.1, 0.05, 0.02]}, width=320, height=200)
    tensor = plot.image_tensor(img)
    assert tensor.shape == (1, 200, 320, 3) and 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    assert len({tuple(p) for p in tensor.reshape(-1, 3).tolist()}) > 5  # axes, two curves, text


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_end_with_identical_weights(tmp_path, folder):
    """DDP over gloo, models through ComfyUI's own loaders (split files), the CLI as a file."""
    from testkit import tiny_models

    models_dir = tmp_path / "models"
    names = tiny_models.write_detectable_sd15_files(str(models_dir))
    taesd = {**{f"taesd_encoder.{k}": v for k, v in load_file(str(models_dir / "vae_approx" / names["taesd_encoder"])).items()},
             **{f"taesd_decoder.{k}": v for k, v in load_file(str(models_dir / "vae_approx" / names["taesd_decoder"])).items()}}
    from safetensors.torch import save_file

    save_file(taesd, str(models_dir / "taesd.safetensors"))
    cfg = tdf.write_config(
        tmp_path / "ddp.json",
        models={"unet": str(models_dir / "unet" / names["unet"]), "clip": str(models_dir / "clip" / names["clip"]), "vae": str(models_dir / "taesd.safetensors")},
        data={"folder": str(folder), "resolution": 64, "caption": "a photo of a person", "max_references": 2},
        targets={"pva": {"train_projector": True, "tokens": 4, "layers": 1, "ff_dim": 64}},
        train={"steps": 2, "batch_size": 1, "grad_accum": 2, "learning_rate": 1e-4, "log_every": 1, "checkpoint_every": 0},
        output={"dir": str(tmp_path / "ddp"), "name": "pva", "save_every_rank": True},
    )
    from harness.host import comfyui_dir

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0" if False else str(29500 + os.getpid() % 1000),
           str(REPO / "train.py"), str(cfg), "--comfyui", str(comfyui_dir())]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    r0 = load_file(str(tmp_path / "ddp" / "final_rank0.safetensors"))
    r1 = load_file(str(tmp_path / "ddp" / "final_rank1.safetensors"))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    exported = native.read_native(str(tmp_path / "ddp" / "pva.safetensors"))
    assert len(exported.layers) == 4 and exported.base == "sd15"  # the detectable one-level UNet: input, middle, 2 output layers
    assert "step 2/2" in done.stderr


def _target_config(tmp_path, folder, name, targets, caption="a photo of a person", steps=2):
    return tdf.write_config(
        tmp_path / f"{name}.json",
        models={"factory": "training_data_fixtures:tiny_models"},
        data={"folder": str(folder), "resolution": 64, "caption": caption},
        targets=targets,
        train={"steps": steps, "batch_size": 1, "grad_accum": 1, "learning_rate": 1e-3, "log_every": 1, "checkpoint_every": 0},
        output={"dir": str(tmp_path / name), "name": name},
    )


def test_ca2_score_predictor_trains_and_exports_its_weight_names(tmp_path, folder, models):
    adapter_path = tmp_path / "visual.safetensors"
    native.write_native(tiny_pva_adapter(models[0], seed=6), str(adapter_path))
    run = trainer_mod.run(str(_target_config(tmp_path, folder, "ca2", {"ca2_score": {"adapter": str(adapter_path), "hidden": 8}})), models=models)
    assert all(math_isfinite(v) for v in run.history["loss"])
    out = native.read_native(str(tmp_path / "ca2" / "ca2.safetensors"))
    assert out.mechanism == "ca2" and out.extras["ca2_score_activation"] == "gelu" and len(out.layers) == 16
    entry = out.layers[("input", 1, 0)]
    assert set(entry) == {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias", "to_k", "to_v"}
    assert entry["score.0.weight"].shape == (8, 32 + 768) and entry["score.2.weight"].shape == (2, 8)
    start = pack("adapters.training.trainable_modules").ScorePredictors({("input", 1, 0): 32}, 768, hidden=8, seed=0).export()[("input", 1, 0)]
    assert not torch.equal(start["score.0.weight"], entry["score.0.weight"])  # it trained


def test_face_adapter_trains_with_fair_and_exports_facts_names(tmp_path, folder, models):
    adapter_path = tmp_path / "faces.safetensors"
    native.write_native(tiny_pva_adapter(models[0], seed=7), str(adapter_path))
    run = trainer_mod.run(str(_target_config(tmp_path, folder, "fact", {"face_adapter": {"adapter": str(adapter_path), "fair_weight": 0.01}})), models=models)
    assert "fair" in run.history and all(math_isfinite(v) for v in run.history["fair"])
    out = native.read_native(str(tmp_path / "fact" / "fact.safetensors"))
    names = set(pack("adapters.formats.weight_formats").FACT_NAMES)
    assert out.mechanism == "gated_self_attention" and len(out.layers) == 16
    assert set(out.layers[("input", 1, 0)]) == names
    assert any(float(e["alpha_attn"].abs()) > 0 for e in out.layers.values())  # the gates opened
    # the face-adapter node takes the file and changes the model's prediction
    from training_fixtures import inference_models

    model, clip, vae = inference_models("sd15", seed=0)
    ApplyFaceAdapter = pack("nodes.fact.face_adapter_nodes").ApplyFaceAdapter
    with torch.inference_mode():
        patched = ApplyFaceAdapter().apply(model, out, identity(2), 1.0, 0.0, 1.0, "both", "fused")[0]
    x0, sigma, eps = fixed_batch(model, vae)
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(x0_prediction(patched, x0, sigma, eps, context), x0_prediction(model, x0, sigma, eps, context))


def test_stage_tokens_train_with_the_face_wise_attention_loss(tmp_path, folder, models):
    run = trainer_mod.run(str(_target_config(tmp_path, folder, "sefi", {"stage_tokens": {"stages": 5, "attention_weight": 0.003}}, caption="a photo of a <new1> person")), models=models)
    assert "face_attention" in run.history and all(v > 0 for v in run.history["face_attention"])
    tensors = load_file(str(tmp_path / "sefi" / "sefi.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "sefi" / "sefi.safetensors"), "pt") as f:
        header = f.metadata()
    assert header["format"] == "identity_attention_tokens" and header["count"] == "5" and header["encoders"] == "l"
    assert tensors["l.keys"].shape == (5, 1, 768) and tensors["l.values"].shape == (5, 1, 768)
    loaded = pack("adapters.attention.stage_tokens").StageTokens.from_file_dict(tensors, header)  # what 'Load identity tokens' does
    assert loaded.stages == 5 and loaded.base == "sd15" and torch.equal(loaded.keys["l"], tensors["l.keys"])
    stage_of = pack("nodes.training.stage_token_training").stage_of
    assert stage_of(torch.tensor([999, 800, 799, 0]), 5).tolist() == [0, 0, 1, 4]


def math_isfinite(v) -> bool:
    import math

    return math.isfinite(v)
