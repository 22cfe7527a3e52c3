"""FACT's moved ``norm2``: the file's ``ln`` feeds the text cross-attention, on the patched clone only.

Official order (github:modelscope/facechain ``face_adapter/face_adapter_v1.py`` set_adapter /
load_adapter and ``face_attention_processor_v1.py`` FaceAttnProcessor): per adapted block
``x += attn1(norm1(x))``; ``x2 = GSA(x)``; ``x = x2 + attn2(ln(x2), text)`` with ``ln`` the
checkpoint's ``...attn2.processor.ln.*`` (the block's norm2 is moved into the processor and then
overwritten by ``load_state_dict``); ``x += ff(norm3(x))``. The reference below is that order in
float64, from the block's own weights and the file's tensors.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import comfy.model_management
from conftest import pack
from test_face_adapter import extra_options_for, gelu64, ln64, reference_fact, sample
from testkit.synthetic import synthetic_identity
import weight_fixtures as wf

gsa = pack("adapters.attention.gated_self_attention")
formats = pack("adapters.formats.weight_formats")
safe_load = pack("adapters.weights.safe_load")
host = pack("nodes.common.host")
nodes_mod = pack("nodes.fact.face_adapter_nodes")
errors = pack("nodes.common.errors")


def fact_file(tmp_path, seed=7):
    """A FACT checkpoint (official key layout, .ckpt) whose ``ln`` is far from any base model's norm2."""
    state, _ = wf.fact_state(seed=seed, moved_norm=True)
    gen = torch.Generator().manual_seed(seed + 100)
    for name in [n for n in state if n.endswith(".processor.ln.weight")]:
        c = state[name].shape[0]
        state[name] = 2.0 + 0.5 * torch.randn(c, generator=gen)
        state[name.replace("ln.weight", "ln.bias")] = 0.4 * torch.randn(c, generator=gen)
    path = tmp_path / "adapter_maj_mask_large_new_reg001_faceshuffle_00290001.ckpt"
    torch.save(state, path)
    loaded = safe_load.read_weight_file(str(path))
    return formats.convert(loaded.tensors, loaded.metadata, source=path.name)


def apply_node(model, adapter, identity, weight, **kw):
    args = dict(start_percent=0.0, end_percent=1.0, apply_to="both", references="per_reference")
    args.update(kw)
    return nodes_mod.ApplyFaceAdapter().apply(model, adapter, identity, weight, **args)[0]


def norm2_of(model, info):
    return model.model.diffusion_model.get_submodule(info.module_path).norm2


def attention64(xq, ctx, attn, heads):
    """A ComfyUI CrossAttention in float64 from its weights: to_q/k/v without bias, to_out[0] with."""
    w = lambda lin: lin.weight.double()  # noqa: E731
    q, k, v = xq @ w(attn.to_q).T, ctx @ w(attn.to_k).T, ctx @ w(attn.to_v).T
    b, n, c = q.shape
    d = c // heads
    split = lambda t: t.reshape(b, -1, heads, d).permute(0, 2, 1, 3)  # noqa: E731
    o = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1) @ split(v)
    o = o.permute(0, 2, 1, 3).reshape(b, n, c)
    return o @ w(attn.to_out[0]).T + attn.to_out[0].bias.double()


def official_block64(block, x, context, face_tokens, W, heads, g, ln):
    """FACT's block in float64: attn1, gated self-attention, attn2 on ln(x2), ff (see module docstring)."""
    n1, n3 = block.norm1, block.norm3
    h = x + attention64(ln64(x, n1.weight.double(), n1.bias.double()), ln64(x, n1.weight.double(), n1.bias.double()), block.attn1, heads)
    x2 = reference_fact(h, face_tokens, W, heads, g)
    h = x2 + attention64(ln64(x2, ln[0].double(), ln[1].double()), context, block.attn2, heads)
    a, gate = (ln64(h, n3.weight.double(), n3.bias.double()) @ block.ff.net[0].proj.weight.double().T + block.ff.net[0].proj.bias.double()).chunk(2, dim=-1)
    return h + (a * gelu64(gate)) @ block.ff.net[2].weight.double().T + block.ff.net[2].bias.double()


@pytest.fixture
def exact_attention(monkeypatch):
    """The host's attention replaced by the float64-exact reference (the CPU host's is float32 inside)."""
    import comfy.ldm.modules.attention as comfy_attention

    core = pack("adapters.attention.attention_core")
    # the current host also passes attn_precision / transformer_options: float64 needs neither
    monkeypatch.setattr(comfy_attention, "optimized_attention", lambda q, k, v, heads, *a, **kw: core.reference_attention(q, k, v, heads))


def test_file_ln_feeds_the_text_attention_as_in_the_official_block(tiny, tmp_path, exact_attention):
    model = tiny.unet("sd15")
    adapter = fact_file(tmp_path)
    assert adapter.extras["moved_block_norm"] is True
    identity = synthetic_identity(1, seed=4, clip=False, face_tokens=True)
    patched = apply_node(model, adapter, identity, 0.7)
    infos = host.cross_attention_layers(model)
    base_norms = {info.key: (norm2_of(model, info).weight.clone(), norm2_of(model, info).bias.clone()) for info in infos}

    comfy.model_management.load_models_gpu([patched])
    for info in infos:  # every adapted block's norm2 is the file's ln while the clone is loaded
        ln = gsa.block_norm(adapter.layer(info.key))
        assert torch.equal(norm2_of(patched, info).weight, ln[0].to(norm2_of(patched, info).weight))
        assert torch.equal(norm2_of(patched, info).bias, ln[1].to(norm2_of(patched, info).bias))
    info = infos[0]
    block = copy.deepcopy(model.model.diffusion_model.get_submodule(info.module_path)).double()
    comfy.model_management.load_models_gpu([model])
    for info_ in infos:  # the upstream MODEL's blocks are the base model's again
        assert torch.equal(norm2_of(model, info_).weight, base_norms[info_.key][0])
        assert torch.equal(norm2_of(model, info_).bias, base_norms[info_.key][1])

    patch = patched.model_options["transformer_options"]["patches"]["middle_patch"][-1]
    tokens = adapter.identity_tokens(identity, per_reference=True)
    gen = torch.Generator().manual_seed(5)
    hw = (8, 8)
    x = torch.randn(2, hw[0] * hw[1], info.inner_dim, generator=gen, dtype=torch.float64)  # rows [uncond, cond]
    context = torch.randn(2, 77, 768, generator=gen, dtype=torch.float64)
    options = extra_options_for(info.key, block.n_heads, hw, chunks=(1, 0))
    options["patches"] = {"middle_patch": [patch]}
    with torch.no_grad():
        got = block(x.clone(), context=context, transformer_options=options)
    W = {k: v.double() for k, v in adapter.layer(info.key).items()}
    ln = (W["ln.weight"], W["ln.bias"])
    face = torch.cat([tokens.uncond, tokens.cond]).double()
    expected = official_block64(block, x, context, face, W, block.n_heads, 0.7, ln)
    # the file is float32 and the patch projects the face tokens once, in the file's precision
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # the test can tell: with the base model's norm2 the block is far from it
    with_base = official_block64(block, x, context, face, W, block.n_heads, 0.7, tuple(t.double() for t in base_norms[info.key]))
    assert (with_base - expected).abs().max() > 1e-2


def test_scoped_to_the_clone_and_off_at_weight_zero(tiny, tmp_path):
    model = tiny.unet("sd15")
    other = model.clone()  # a branch of the graph without the node
    adapter = fact_file(tmp_path, seed=9)
    identity = synthetic_identity(1, seed=4, clip=False, face_tokens=True)
    infos = host.cross_attention_layers(model)
    base_norms = {info.key: norm2_of(model, info).weight.clone() for info in infos}
    plain = sample(model, "sd15")

    zero = apply_node(model, adapter, identity, 0.0)
    assert not any(".norm2." in key for key in zero.patches)  # weight 0 adds nothing at all
    assert torch.equal(sample(zero, "sd15"), plain)

    patched = apply_node(model, adapter, identity, 0.6)
    assert sum(".norm2." in key for key in patched.patches) == 2 * len(infos)
    ln_only = apply_node(model, adapter, identity, 0.6, start_percent=1.0, end_percent=1.0)  # gate never on
    got, got_ln_only = sample(patched, "sd15"), sample(ln_only, "sd15")
    assert torch.isfinite(got).all() and not torch.allclose(got, plain, atol=1e-4)
    assert not torch.allclose(got_ln_only, plain, atol=1e-4)  # the ln applies outside the gate's window, as in FACT

    assert not any(".norm2." in key for key in model.patches) and not any(".norm2." in key for key in other.patches)
    assert torch.equal(sample(other, "sd15"), plain)  # another clone, sampled right after the patched one
    assert torch.equal(sample(model, "sd15"), plain)
    for info in infos:
        assert torch.equal(norm2_of(model, info).weight, base_norms[info.key])


def test_ln_of_the_wrong_width_is_reported(tiny):
    from testkit.synthetic import synthetic_fact_adapter

    model = tiny.unet("sd15")
    layers = host.cross_attention_layers(model)
    adapter = synthetic_fact_adapter(layers, "sd15", 768)
    layer = adapter.layers[layers[0].key]
    layer["ln.weight"], layer["ln.bias"] = torch.ones(3), torch.zeros(3)
    with pytest.raises(errors.IdentityAttentionError, match="ln.weight has shape"):
        apply_node(model, adapter, synthetic_identity(1, face_tokens=True), 0.5)
    del layer["ln.bias"]
    assert "without ln.bias" in gsa.check_layer(layer, layers[0].inner_dim, 768)
