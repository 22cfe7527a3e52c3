"""Trained Nested Attention: the query-former, the per-row nested formula with its value regularizer, the nested target."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import training_data_fixtures as tdf
from conftest import pack

qf = pack("adapters.projectors.query_former")
nested = pack("adapters.attention.nested_attention")
native = pack("adapters.formats.native_format")
trainer_mod = pack("nodes.training.trainer")
IdentityFeatures = pack("adapters.faces.identity").IdentityFeatures


def randomized(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1))
    return module.eval()


def ln64(x, w, b):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def gelu64(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def query_former64(m, x):
    """The documented architecture by hand in float64: ``x`` ``[B, L, E]`` -> ``[B, T, D]``."""
    sd = {k: v.double() for k, v in m.state_dict().items()}
    x = x.double() @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    q = sd["queries"].expand(x.shape[0], -1, -1)
    heads = m.config["heads"]
    for i in range(m.config["depth"]):
        p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        qn = ln64(q, p("norm_q.weight"), p("norm_q.bias"))
        kv = torch.cat([ln64(x, p("norm_x.weight"), p("norm_x.bias")), qn], 1)
        Q, K, V = qn @ p("to_q.weight").T, kv @ p("to_k.weight").T, kv @ p("to_v.weight").T
        d = Q.shape[-1] // heads
        outs = []
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            outs.append(torch.softmax(Q[..., s] @ K[..., s].transpose(1, 2) / math.sqrt(d), -1) @ V[..., s])
        q = q + torch.cat(outs, -1) @ p("to_out.weight").T + p("to_out.bias")
        f = ln64(q, p("norm_ff.weight"), p("norm_ff.bias"))
        q = q + gelu64(f @ p("ff1.weight").T + p("ff1.bias")) @ p("ff2.weight").T + p("ff2.bias")
    return ln64(q @ sd["proj_out.weight"].T + sd["proj_out.bias"], sd["norm_out.weight"], sd["norm_out.bias"])


@pytest.mark.parametrize("kind", ["arcface_normed", "clip_hidden"])
def test_query_former_matches_the_float64_reference(kind):
    m = randomized(qf.QueryFormer(in_dim=24, dim=16, token_dim=12, tokens=3, depth=2, heads=4, input_kind=kind), 0)
    x = torch.randn(2, 24) if kind == "arcface_normed" else torch.randn(2, 5, 24)
    feats = IdentityFeatures(arcface=torch.zeros(2, 24), arcface_normed=x if x.dim() == 2 else torch.zeros(2, 24), clip_hidden=x if x.dim() == 3 else None)
    got = m.project(feats)
    assert got.shape == (2, 3, 12)
    torch.testing.assert_close(got.double(), query_former64(m, x if x.dim() == 3 else x[:, None]), rtol=1e-4, atol=1e-5)


def sdpa64(q, k, v, heads):
    b, n, c = q.shape
    d = c // heads
    split = lambda t: t.double().reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    p = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), -1)
    return (p @ split(v)).transpose(1, 2).reshape(b, n, c)


def attention_fn(q, k, v, heads):
    return sdpa64(q, k, v, heads).to(q.dtype)


def test_per_row_nested_formula_and_value_gap():
    gen = torch.Generator().manual_seed(1)
    B, N, M, T, H, C = 3, 5, 7, 4, 2, 8
    q, k, v = (torch.randn(B, x, C, generator=gen, dtype=torch.float64) for x in (N, M, M))
    kn, vn = torch.randn(B, T, C, generator=gen, dtype=torch.float64), torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    out = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    index = [2, 5, -1]  # the third row has no subject
    hot = torch.zeros(B, M, 1, dtype=torch.float64)
    for b, i in enumerate(index):
        if i >= 0:
            hot[b, i] = 1
    new, vstar, v_s = nested.nested_attention_rows(out, q, k, v, kn, vn, hot, H, attention_fn)
    d = C // H
    for b, i in enumerate(index):  # the paper's form: replace V[s] per query, then the outer attention
        if i < 0:
            torch.testing.assert_close(new[b], out[b])
            continue
        for h in range(H):
            s = slice(h * d, (h + 1) * d)
            p = torch.softmax(q[b, :, s] @ k[b, :, s].T / math.sqrt(d), -1)  # [N, M]
            vstar_bh = torch.softmax(q[b, :, s] @ kn[b, :, s].T / math.sqrt(d), -1) @ vn[b, :, s]  # [N, d]
            with_text = p @ v[b, :, s]
            replaced = with_text + p[:, i : i + 1] * (vstar_bh - v[b, i, s])
            torch.testing.assert_close(new[b, :, s] - out[b, :, s] + with_text, replaced)
    gap = nested.value_gap(vstar, v_s, torch.tensor([True, True, False]))
    expected = ((vstar[:2] - v_s[:2]) ** 2).mean(dim=(1, 2)).mean()
    torch.testing.assert_close(gap, expected.float(), rtol=1e-6, atol=1e-7)
    # one shared position: identical to the inference formula
    same = torch.zeros(B, M, 1, dtype=torch.float64)
    same[:, 3] = 1
    torch.testing.assert_close(nested.nested_attention_rows(out, q, k, v, kn, vn, same, H, attention_fn)[0], nested.nested_attention(out, q, k, v, kn, vn, [3], H, attention_fn))


# --- the trainer target --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    return tdf.tiny_models("sd15", 0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tdf.make_folder(tmp_path_factory.mktemp("nested") / "data")


def config(tmp_path, folder, out, steps=3, **train):
    return tdf.write_config(
        tmp_path / f"{out}.json",
        models={"factory": "training_data_fixtures:tiny_models"},
        data={"folder": str(folder), "resolution": 64, "caption": "a photo of a person", "max_references": 2},
        targets={"nested": {"tokens": 3, "dim": 32, "heads": 4, "depth": 1, "encoder_lr": 1e-2, "value_reg": 0.01}},
        train={"steps": steps, "batch_size": 1, "grad_accum": 1, "learning_rate": 1e-3, "log_every": 1, "checkpoint_every": 0, **train},
        output={"dir": str(tmp_path / out), "name": "nested"},
    )


def test_nested_target_resumes_exactly_and_the_node_applies_its_file(tmp_path, folder, models):
    whole = trainer_mod.run(str(config(tmp_path, folder, "whole")), models=models)
    assert set(whole.history) == {"loss", "denoise", "value_reg"} and all(v >= 0 for v in whole.history["value_reg"])
    cfg = config(tmp_path, folder, "parts")
    trainer_mod.run(str(cfg), stop_at=2, models=models)
    parts = trainer_mod.run(str(cfg), resume=str(tmp_path / "parts"), models=models)
    assert parts.history == whole.history
    a, b = load_file(str(tmp_path / "whole" / "nested.safetensors")), load_file(str(tmp_path / "parts" / "nested.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = native.read_native(str(tmp_path / "whole" / "nested.safetensors"))
    assert loaded.mechanism == "nested" and type(loaded.projector).__name__ == "QueryFormer"
    assert set(loaded.layers[("input", 1, 0)]) == {"nested.to_k", "nested.to_v"}
    from training_fixtures import fixed_batch, identity, inference_models, x0_prediction

    model, _, vae = inference_models("sd15", seed=0)
    node = pack("nodes.nested.nested_attention_nodes").ApplyNestedAttention()
    with torch.inference_mode():
        patched = node.apply(model, loaded, identity(2), "native nested weights (nested.to_k, nested.to_v)", "token index", 5, 1.0, 0.0, 1.0, "both", "fused")[0]
    x0, sigma, eps = fixed_batch(model, vae)
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(x0_prediction(patched, x0, sigma, eps, context), x0_prediction(model, x0, sigma, eps, context))


def test_nested_training_lowers_the_loss(tmp_path, models):
    one = tdf.make_folder(tmp_path / "one", identities=1, per_identity=2, seed=3)
    cfg = trainer_mod.load_config(str(config(tmp_path, one, "down", steps=8, condition_dropout=0)))
    trainer = trainer_mod.Trainer(cfg, models, config_dir=str(tmp_path))
    try:
        mb = trainer._micro_batch(0, 0)
        assert trainer.targets[0].subject_index("a photo of a person") == 5  # "person", after the start token
        before = _loss(trainer, mb)
        trainer.train(progress=False)
        after = _loss(trainer, mb)
    finally:
        trainer.close()
    assert after < before, (before, after)


def _loss(trainer, mb) -> float:
    with torch.inference_mode(False), torch.no_grad(), trainer.models:
        return float(trainer._loss(mb)[1]["denoise"])
