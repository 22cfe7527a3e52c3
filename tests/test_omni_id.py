"""Identity from many photos: attention pooling (training-free), the set encoder and the omni_id target (few-to-many)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import training_data_fixtures as tdf
from conftest import pack
from layer_harness import SD15_KEY, adapter_for, attention64, close, layer_inputs, rows_of, run_layer
from testkit.synthetic import synthetic_identity

set_mod = pack("adapters.projectors.set_encoder")
qf = pack("adapters.projectors.query_former")
native = pack("adapters.formats.native_format")
trainer_mod = pack("nodes.training.trainer")
errors = pack("nodes.common.errors")
PoolNode = pack("nodes.identity.omni_id_nodes").PoolReferencePhotos
ApplyParallelAttention = pack("nodes.pva.parallel_attention_nodes").ApplyParallelAttention


def pool64(tokens, tau=0.1):
    """By hand: per token position, softmax over photos of (mean cosine to the other photos)/tau, weighted sum."""
    t = tokens.double()
    m, n, d = t.shape
    out = torch.zeros(1, n, d, dtype=torch.float64)
    for j in range(n):
        def cos(a, b):
            return float(t[a, j] @ t[b, j]) / math.sqrt(float(t[a, j] @ t[a, j]) * float(t[b, j] @ t[b, j]))
        g = [sum(cos(i, k) for k in range(m) if k != i) / (m - 1) for i in range(m)]
        w = torch.softmax(torch.tensor(g, dtype=torch.float64) / tau, 0)
        out[0, j] = sum(w[i] * t[i, j] for i in range(m))
    return out


def test_attention_pool_matches_the_reference_and_downweights_an_outlier():
    tokens = torch.randn(3, 4, 8)
    torch.testing.assert_close(set_mod.attention_pool(tokens).double(), pool64(tokens), rtol=1e-5, atol=1e-6)
    one = torch.randn(1, 4, 8)
    torch.testing.assert_close(set_mod.attention_pool(one), one)
    agree = torch.ones(1, 1, 8)
    photos = torch.cat([agree, agree, -3 * agree])  # two photos agree, the third points elsewhere
    assert float((set_mod.attention_pool(photos) - agree).abs().max()) < float((photos.mean(0, keepdim=True) - agree).abs().max())


def test_pool_node_makes_any_adapter_read_every_photo(tiny):
    model = tiny.unet("sd15")
    adapter = adapter_for(model, num_tokens=4, seed=2)
    identity = synthetic_identity(3, seed=3, clip=False)
    pooled = PoolNode().pool(adapter)[0]
    per_photo = adapter.projector.project(identity.features(per_reference=True)).detach()  # [3, 4, D]
    tokens = pooled.identity_tokens(identity, per_reference=False)  # a set reader ignores "fused"
    torch.testing.assert_close(tokens.cond.double(), pool64(per_photo), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        patched = ApplyParallelAttention().apply(model, pooled, identity, 0.8, 0.0, 1.0, "both", "decoupled", "adapter", "fused")[0]
    inputs = layer_inputs(patched, SD15_KEY)
    w = adapter.layers[SD15_KEY]
    rows = rows_of(inputs, {0: tokens.cond, 1: tokens.uncond})
    H = inputs.info.heads
    close(run_layer(patched, inputs), attention64(inputs.q, inputs.k, inputs.v, H) + 0.8 * attention64(inputs.q, rows @ w["to_k"].double().T, rows @ w["to_v"].double().T, H))
    with pytest.raises(errors.IdentityAttentionError) as info:
        PoolNode().pool(pooled)
    assert "'id_adapter'" in str(info.value)


def test_set_encoder_reads_any_number_of_photos_into_a_fixed_size():
    m = qf.QueryFormer(in_dim=512, dim=32, token_dim=16, tokens=5, depth=1, heads=4, reads_set=True).eval()
    IdentityFeatures = pack("adapters.faces.identity").IdentityFeatures
    outs = []
    for count in (1, 3, 7):
        x = torch.randn(count, 512)
        outs.append(m.project(IdentityFeatures(arcface=x, arcface_normed=x)))
    assert all(o.shape == (1, 5, 16) for o in outs)
    x = torch.randn(4, 512)
    shuffled = m.project(IdentityFeatures(arcface=x.flip(0), arcface_normed=x.flip(0)))
    torch.testing.assert_close(m.project(IdentityFeatures(arcface=x, arcface_normed=x)), shuffled, rtol=1e-5, atol=1e-5)  # a set: order-free


# --- the trainer target --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    return tdf.tiny_models("sd15", 0)


def config(tmp_path, folder, out, steps=3, **train):
    return tdf.write_config(
        tmp_path / f"{out}.json",
        models={"factory": "training_data_fixtures:tiny_models"},
        data={"folder": str(folder), "resolution": 64, "caption": "a photo of a person", "max_references": 3},
        targets={"omni_id": {"tokens": 3, "dim": 32, "heads": 4, "depth": 1, "encoder_lr": 1e-2}},
        train={"steps": steps, "batch_size": 1, "grad_accum": 1, "learning_rate": 1e-3, "log_every": 1, "checkpoint_every": 0, **train},
        output={"dir": str(tmp_path / out), "name": "omni"},
    )


def test_omni_id_target_is_few_to_many_resumes_exactly_and_loads_as_an_adapter(tmp_path, models):
    folder = tdf.make_folder(tmp_path / "data", identities=1, per_identity=4, seed=5)
    cfg = trainer_mod.load_config(str(config(tmp_path, folder, "check")))
    trainer = trainer_mod.Trainer(cfg, models, config_dir=str(tmp_path))
    try:  # few-to-many: the references never include the photo being denoised
        for k in range(5):
            s = trainer.dataset.sample(trainer.dataset.position(k))
            if len(trainer.dataset.index.groups[s.identity]) == 1:
                continue  # the folder's loner is its own only reference
            own = load_file(s.path[:-4] + ".id.safetensors")["arcface"]
            assert not any(torch.equal(own, r) for r in s.features["arcface"]) and 1 <= s.features["arcface"].shape[0] <= 3
    finally:
        trainer.close()
    whole = trainer_mod.run(str(config(tmp_path, folder, "whole")), models=models)
    cfg = config(tmp_path, folder, "parts")
    trainer_mod.run(str(cfg), stop_at=1, models=models)
    parts = trainer_mod.run(str(cfg), resume=str(tmp_path / "parts"), models=models)
    assert parts.history == whole.history
    a, b = load_file(str(tmp_path / "whole" / "omni.safetensors")), load_file(str(tmp_path / "parts" / "omni.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = native.read_native(str(tmp_path / "whole" / "omni.safetensors"))
    assert loaded.mechanism == "decoupled" and loaded.projector.reads_set and loaded.projector.num_tokens == 3
    identity = synthetic_identity(5, seed=1, clip=False)
    assert loaded.identity_tokens(identity).cond.shape == (1, 3, 768)  # five photos -> the fixed-size set
    from training_fixtures import fixed_batch, inference_models, x0_prediction

    model, _, vae = inference_models("sd15", seed=0)
    with torch.inference_mode():
        patched = ApplyParallelAttention().apply(model, loaded, identity, 1.0, 0.0, 1.0, "both", "decoupled", "adapter", "fused")[0]
    x0, sigma, eps = fixed_batch(model, vae)
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(x0_prediction(patched, x0, sigma, eps, context), x0_prediction(model, x0, sigma, eps, context))


def test_omni_id_training_lowers_the_loss(tmp_path, models):
    folder = tdf.make_folder(tmp_path / "one", identities=1, per_identity=2, seed=3)
    cfg = trainer_mod.load_config(str(config(tmp_path, folder, "down", steps=8, condition_dropout=0)))
    trainer = trainer_mod.Trainer(cfg, models, config_dir=str(tmp_path))
    try:
        mb = trainer._micro_batch(0, 0)
        before = _loss(trainer, mb)
        trainer.train(progress=False)
        after = _loss(trainer, mb)
    finally:
        trainer.close()
    assert after < before, (before, after)


def _loss(trainer, mb) -> float:
    with torch.inference_mode(False), torch.no_grad(), trainer.models:
        return float(trainer._loss(mb)[0])
