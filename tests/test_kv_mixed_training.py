"""Trained KV-mixed attention (VisualComposer): the two encoders, the node's pairings, the kv_mixed trainer target."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import training_data_fixtures as tdf
from conftest import pack
from layer_harness import SD15_KEY, adapter_for, attention64, close, layer_inputs, rows_of, run_layer, unpatched
from testkit.synthetic import synthetic_identity

enc_mod = pack("adapters.projectors.kv_mixed_encoders")
kv_nodes = pack("nodes.kv_mixed.kv_mixed_nodes")
errors = pack("nodes.common.errors")
native = pack("adapters.formats.native_format")
trainer_mod = pack("nodes.training.trainer")
host = pack("nodes.common.host")
IdAdapter = pack("adapters.projectors.id_adapter").IdAdapter
IdentityFeatures = pack("adapters.faces.identity").IdentityFeatures
NODE = kv_nodes.ApplyKVMixedAttention()


def encoder(seed=0, tokens=3, token_dim=768):
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False):
        e = enc_mod.KVMixedEncoder(in_dim=512, token_dim=token_dim, tokens=tokens, key_bottleneck=8, value_bottleneck=48)
        with torch.no_grad():
            for p in e.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 0.2))
    return e.eval().requires_grad_(False)


def kv_adapter(model, seed=0):
    layers = host.cross_attention_layers(model)
    e = encoder(seed, token_dim=layers[0].context_dim)
    gen = torch.Generator().manual_seed(seed + 1)
    per_layer = {i.key: {n: torch.randn(i.inner_dim, e.token_dim, generator=gen) * 0.05 for n in ("to_k", "to_v")} for i in layers}
    return IdAdapter(format="native", base="sd15", context_dim=layers[0].context_dim, projector=e, layers=per_layer, mechanism="kv_mixed")


def encoder64(e, x):
    """The documented encoders by hand in float64: LayerNorm(W2 gelu(W1 x + b1) + b2), per encoder."""
    out = []
    for sub in (e.key_encoder, e.value_encoder):
        sd = {k: v.double() for k, v in sub.state_dict().items()}
        h = x.double() @ sd["down.weight"].T + sd["down.bias"]
        h = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))
        h = (h @ sd["up.weight"].T + sd["up.bias"]).reshape(x.shape[0], sub.num_tokens, sub.token_dim)
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        out.append((h - mu) / torch.sqrt(var + 1e-5) * sd["norm.weight"] + sd["norm.bias"])
    return out


def test_encoders_match_the_float64_reference_and_split():
    e = encoder(1)
    x = F.normalize(torch.randn(2, 512), dim=-1)
    feats = IdentityFeatures(arcface=x * 20, arcface_normed=x)
    tokens = e.project(feats)
    assert tokens.shape == (2, 6, 768) and e.num_tokens == 6
    keys, values = enc_mod.split_key_value(tokens.reshape(1, 12, 768), 3)
    k64, v64 = encoder64(e, x)
    torch.testing.assert_close(keys.double(), k64.reshape(1, 6, 768), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(values.double(), v64.reshape(1, 6, 768), rtol=1e-4, atol=1e-4)
    assert e.key_encoder.down.out_features < e.value_encoder.down.out_features  # small vs large bottleneck


def apply(model, adapter, identity, pairing, weight=0.9, references="fused", **kw):
    return NODE.apply(model, adapter, identity, weight, 0.0, 1.0, "both", "decoupled", "resample_values", "adapter", references, pairing=pairing, **kw)[0]


@pytest.mark.parametrize("references", ["fused", "per_reference"])
def test_trained_pairing_formula(tiny, references):
    model = tiny.unet("sd15")
    adapter = kv_adapter(model, seed=3)
    identity = synthetic_identity(2, seed=4, clip=False)
    patched = apply(model, adapter, identity, kv_nodes.TRAINED, references=references)
    inputs = layer_inputs(patched, SD15_KEY)
    feats = identity.features(per_reference=references == "per_reference")
    k_c, v_c = encoder64(adapter.projector, feats.arcface_normed)
    k_u, v_u = encoder64(adapter.projector, torch.zeros(1, 512))
    w = adapter.layers[SD15_KEY]
    k_id = rows_of(inputs, {0: k_c.reshape(1, -1, 768), 1: k_u.repeat(1, k_c.shape[0], 1)}) @ w["to_k"].double().T
    v_id = rows_of(inputs, {0: v_c.reshape(1, -1, 768), 1: v_u.repeat(1, v_c.shape[0], 1)}) @ w["to_v"].double().T
    H = inputs.info.heads
    close(run_layer(patched, inputs), attention64(inputs.q, inputs.k, inputs.v, H) + 0.9 * attention64(inputs.q, k_id, v_id, H), tol=1e-4)
    off = apply(model, adapter, identity, kv_nodes.TRAINED, weight=0.0)
    assert torch.equal(run_layer(off, inputs), unpatched(inputs))


def test_one_token_set_pairing_formula(tiny):
    model = tiny.unet("sd15")
    adapter, identity = adapter_for(model, num_tokens=4, seed=5), synthetic_identity(1, seed=6, clip=False)
    patched = apply(model, adapter, identity, kv_nodes.SHARED, weight=0.6)
    inputs = layer_inputs(patched, SD15_KEY)
    attn2 = model.model.diffusion_model.get_submodule(inputs.info.module_path).attn2
    t = adapter.identity_tokens(identity)
    rows = rows_of(inputs, {0: t.cond, 1: t.uncond})
    k_id = rows @ attn2.to_k.weight.double().T  # the model's own key projection
    v_id = rows @ adapter.layers[SD15_KEY]["to_v"].double().T  # the adapter's value projection, same tokens
    H = inputs.info.heads
    close(run_layer(patched, inputs), attention64(inputs.q, inputs.k, inputs.v, H) + 0.6 * attention64(inputs.q, k_id, v_id, H))


def test_pairing_errors(tiny):
    model = tiny.unet("sd15")
    plain, identity = adapter_for(model, num_tokens=4), synthetic_identity(1, seed=6, clip=False)
    with pytest.raises(errors.IdentityAttentionError) as info:
        apply(model, plain, identity, kv_nodes.TRAINED)
    assert "'key_adapter'" in str(info.value) and "kv_mixed" in str(info.value)
    with pytest.raises(errors.IdentityAttentionError) as info:
        apply(model, kv_adapter(model), identity, kv_nodes.TRAINED, value_adapter=plain, value_identity=identity)
    assert "'pairing'" in str(info.value)
    with pytest.raises(errors.IdentityAttentionError) as info:
        apply(model, plain, identity, kv_nodes.TWO_ADAPTERS)
    assert "'value_adapter'" in str(info.value)
    assert NODE.INPUT_TYPES()["optional"]["pairing"][1]["default"] == kv_nodes.TRAINED


# --- the trainer target --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    return tdf.tiny_models("sd15", 0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tdf.make_folder(tmp_path_factory.mktemp("kv") / "data")


def config(tmp_path, folder, out, steps=3, **train):
    return tdf.write_config(
        tmp_path / f"{out}.json",
        models={"factory": "training_data_fixtures:tiny_models"},
        data={"folder": str(folder), "resolution": 64, "caption": "a photo of a person", "max_references": 2},
        targets={"kv_mixed": {"tokens": 2, "key_bottleneck": 4, "value_bottleneck": 32, "encoder_lr": 1e-2}},
        train={"steps": steps, "batch_size": 1, "grad_accum": 1, "learning_rate": 1e-3, "log_every": 1, "checkpoint_every": 0, **train},
        output={"dir": str(tmp_path / out), "name": "kv"},
    )


def test_kv_mixed_target_resumes_exactly_and_exports_a_loadable_adapter(tmp_path, folder, models):
    whole = trainer_mod.run(str(config(tmp_path, folder, "whole")), models=models)
    cfg = config(tmp_path, folder, "parts")
    trainer_mod.run(str(cfg), stop_at=1, models=models)
    parts = trainer_mod.run(str(cfg), resume=str(tmp_path / "parts"), models=models)
    assert parts.history == whole.history
    a, b = load_file(str(tmp_path / "whole" / "kv.safetensors")), load_file(str(tmp_path / "parts" / "kv.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = native.read_native(str(tmp_path / "whole" / "kv.safetensors"))  # what 'Load identity adapter' reads
    assert loaded.mechanism == "kv_mixed" and isinstance(loaded.projector, enc_mod.KVMixedEncoder) and loaded.projector.pair_tokens == 2
    assert set(loaded.layers[SD15_KEY]) == {"to_k", "to_v"} and len(loaded.layers) == 16
    from training_fixtures import fixed_batch, inference_models, x0_prediction

    model, _, vae = inference_models("sd15", seed=0)
    with torch.inference_mode():
        patched = apply(model, loaded, synthetic_identity(2, seed=1, clip=False), kv_nodes.TRAINED, weight=1.0)
    x0, sigma, eps = fixed_batch(model, vae)
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(x0_prediction(patched, x0, sigma, eps, context), x0_prediction(model, x0, sigma, eps, context))


def fixed_loss(trainer, mb) -> float:
    with torch.inference_mode(False), torch.no_grad(), trainer.models:
        return float(trainer._loss(mb)[0])


def test_kv_mixed_training_lowers_the_loss(tmp_path, models):
    one = tdf.make_folder(tmp_path / "one", identities=1, per_identity=2, seed=3)
    cfg = trainer_mod.load_config(str(config(tmp_path, one, "down", steps=8, condition_dropout=0)))
    trainer = trainer_mod.Trainer(cfg, models, config_dir=str(tmp_path))
    try:
        mb = trainer._micro_batch(0, 0)
        trainer.samples = 0
        before = fixed_loss(trainer, mb)
        trainer.train(progress=False)
        after = fixed_loss(trainer, mb)
    finally:
        trainer.close()
    assert after < before, (before, after)
