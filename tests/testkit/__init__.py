"""Test kit: nodes that exist only in the test and demo hosts (never in a user's ComfyUI).

- ``IdentityAttentionTestKit_TinyModels``: MODEL, CLIP, VAE of tiny random SD1.5 / SDXL
  architectures (see tiny_models.py); the demo and the workflow tests swap real
  checkpoint loaders for it.
- ``IdentityAttentionTestKit_DummyStage``: a known contribution added through the
  pack's dispatcher (to test stacking, masks, cond/uncond, start/end).
- ``IdentityAttentionTestKit_HandPatch``: the same contributions written by hand as
  a plain attn2 replace, without the dispatcher (the expected result).
- ``IdentityAttentionTestKit_ForeignReplace``: an attn2 replace as another pack would
  install it, to prove ours chains it.
- ``IdentityAttentionTestKit_TinyClipVision``: a tiny CLIP vision model of ComfyUI's own class
  with the real widths (clip_vision.py); the demo and the workflow tests swap CLIPVisionLoader for it.
- ``IdentityAttentionTestKit_SyntheticIdentity`` / ``_SyntheticAdapter`` / ``_SyntheticFactAdapter``:
  IDENTITY and ID_ADAPTER values (IP-Adapter-style or FaceChain-FACT-shaped) from a seed.
- ``IdentityAttentionTestKit_AdapterReport``: a loaded ID_ADAPTER summarised into /history.
- ``IdentityAttentionTestKit_ImageList`` / ``IdentityAttentionTestKit_Report``: images of
  several sizes as one list; values handed back to a test through /history (report_nodes.py).
- ``IdentityAttentionTestKit_TinyFlux`` / ``_TinyFluxClip`` / ``_TinyFluxVae``: the tiny Flux's
  MODEL, CLIP and VAE (tiny_flux.py, flux_nodes.py); the harness swaps Flux loaders for them.
- ``IdentityAttentionTestKit_Tensor`` / ``IdentityAttentionTestKit_DamagedIdentity``: wrong values
  (any shape / dtype / NaN, broken identities) for the bad-input tests (malformed_nodes.py).
"""

from __future__ import annotations

import sys
import threading

import torch

from .malformed_nodes import DamagedIdentity, Number, Tensor
from .report_nodes import ImageList, Report

_CACHE = {}
_LOCK = threading.Lock()


def pack():
    """The loaded Identity Attention package (ComfyUI names it after its folder)."""
    for module in list(sys.modules.values()):
        # read __dict__: some modules (torch.ops) answer any getattr
        if getattr(module, "__dict__", {}).get("IDENTITY_ATTENTION_PACK") is True and hasattr(module, "__path__"):
            return module
    raise RuntimeError("the Identity Attention pack is not loaded in this host")


def pack_module(relative: str):
    import importlib

    return importlib.import_module(f"{pack().__name__}.{relative}")


def _tiny_models():
    from . import tiny_models

    return tiny_models


# --- the contributions, shared by the dispatcher stage and the hand-written patch ------------------


def contribution(kind: str, weight: float, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The new attention output after one dummy contribution.

    add_tanh_q: ``out + w * tanh(q)``; scale_out: ``out * (1 + w)``. They do not
    commute, so stacking order is visible.
    """
    if kind == "add_tanh_q":
        return out + weight * torch.tanh(q)
    if kind == "scale_out":
        return out * (1.0 + weight)
    raise ValueError(kind)


class TinyModels:
    NODE_ID = "IdentityAttentionTestKit_TinyModels"
    DISPLAY_NAME = "Tiny test models (test kit)"
    CATEGORY = "identity_attention/testkit"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    DESCRIPTION = "Random-weight SD1.5 / SDXL architectures small enough for a CPU. Test and demo hosts only."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "arch": (["sd15", "sdxl"], {"tooltip": "Which real architecture to imitate."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Weights are a function of this seed."}),
            }
        }

    def load(self, arch, seed):
        tm = _tiny_models()
        with _LOCK:
            key = (arch, seed)
            if key not in _CACHE:
                _CACHE[key] = (tm.build_unet(arch, seed=seed), tm.build_clip(arch, seed=seed + 1), tm.build_vae(seed=seed + 2))
            model, clip, vae = _CACHE[key]
        return (model.clone(), clip.clone(), vae)


class DummyStage:
    NODE_ID = "IdentityAttentionTestKit_DummyStage"
    DISPLAY_NAME = "Dummy attention stage (test kit)"
    CATEGORY = "identity_attention/testkit"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        stage_inputs = pack_module("nodes.dispatch.stage_inputs")
        required = {
            "model": ("MODEL", {"tooltip": "Model to patch."}),
            "kind": (["add_tanh_q", "scale_out"], {"tooltip": "Which known contribution to add."}),
        }
        required.update(stage_inputs.schedule_inputs())
        return {"required": required, "optional": stage_inputs.mask_input()}

    def apply(self, model, kind, weight, start_percent, end_percent, apply_to, mask=None):
        stage_inputs = pack_module("nodes.dispatch.stage_inputs")
        dispatcher = pack_module("nodes.dispatch.dispatcher")
        schedule = stage_inputs.build_schedule(model, weight, start_percent, end_percent, apply_to, mask, node=self.DISPLAY_NAME)
        return (dispatcher.apply_attention_stage(model, make_dummy_stage(kind, schedule)),)


def make_dummy_stage(kind, schedule):
    dispatcher = pack_module("nodes.dispatch.dispatcher")

    class _Stage(dispatcher.AttentionStage):
        label = f"dummy {kind}"

        def forward(self, call, out, region):
            return dispatcher.blend_in_region(out, contribution(kind, self.schedule.weight, call.q, out), region)

    return _Stage(schedule)


class HandPatch:
    NODE_ID = "IdentityAttentionTestKit_HandPatch"
    DISPLAY_NAME = "Hand-written attention patch (test kit)"
    CATEGORY = "identity_attention/testkit"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "Model to patch."}),
                "ops": ("STRING", {"default": "add_tanh_q:0.5", "tooltip": "Comma-separated kind:weight contributions, applied in order."}),
            }
        }

    def apply(self, model, ops):
        host = pack_module("nodes.common.host")
        steps = [(kind, float(w)) for kind, w in (item.split(":") for item in ops.split(",") if item.strip())]
        previous = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})

        def make(key):
            foreign = previous.get(key) or previous.get(key[:2])

            def replace(q, k, v, extra_options):
                out = foreign(q, k, v, extra_options) if foreign else host.host_attention(q, k, v, extra_options["n_heads"], extra_options)
                for kind, w in steps:
                    out = contribution(kind, w, q, out)
                return out

            return replace

        m = model.clone()
        for info in host.cross_attention_layers(m):
            m.set_model_attn2_replace(make(info.key), *info.key)
        return (m,)


class ForeignReplace:
    NODE_ID = "IdentityAttentionTestKit_ForeignReplace"
    DISPLAY_NAME = "Foreign attn2 replace (test kit)"
    CATEGORY = "identity_attention/testkit"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CALLS = {"count": 0}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "Model to patch."}),
                "factor": ("FLOAT", {"default": 0.5, "min": -4.0, "max": 4.0, "step": 0.01, "tooltip": "The foreign patch scales attention by this."}),
                "block_wide": ("BOOLEAN", {"default": False, "tooltip": "Install under the 2-tuple block key, as some packs do."}),
            }
        }

    def apply(self, model, factor, block_wide):
        host = pack_module("nodes.common.host")
        calls = self.CALLS

        def foreign(q, k, v, extra_options):
            calls["count"] += 1
            return host.host_attention(q, k, v, extra_options["n_heads"], extra_options) * factor

        m = model.clone()
        for info in host.cross_attention_layers(m):
            if block_wide:
                m.set_model_attn2_replace(foreign, info.key[0], info.key[1])
            else:
                m.set_model_attn2_replace(foreign, *info.key)
        return (m,)


class SyntheticIdentity:
    NODE_ID = "IdentityAttentionTestKit_SyntheticIdentity"
    DISPLAY_NAME = "Synthetic identity (test kit)"
    CATEGORY = "identity_attention/testkit"
    RETURN_TYPES = ("IDENTITY",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "references": ("INT", {"default": 1, "min": 1, "max": 8, "tooltip": "How many reference faces."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Everything is a function of this seed."}),
                "with_clip": ("BOOLEAN", {"default": True, "tooltip": "Include CLIP-vision features (257 x 1280 hidden, 1024 embeds)."}),
                "with_face_tokens": ("BOOLEAN", {"default": False, "tooltip": "Include face-encoder patch tokens (144 x 512)."}),
            }
        }

    def make(self, references, seed, with_clip, with_face_tokens):
        from .synthetic import synthetic_identity

        return (synthetic_identity(references, seed, clip=with_clip, face_tokens=with_face_tokens),)


class SyntheticAdapter:
    NODE_ID = "IdentityAttentionTestKit_SyntheticAdapter"
    DISPLAY_NAME = "Synthetic identity adapter (test kit)"
    CATEGORY = "identity_attention/testkit"
    RETURN_TYPES = ("ID_ADAPTER",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The adapter gets K/V projections for every cross-attention layer of this model."}),
                "num_tokens": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Identity tokens per reference."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Weights are a function of this seed."}),
                "visual_q": ("BOOLEAN", {"default": False, "tooltip": "Also give each layer a separate identity query projection (PVA's to_visual_q)."}),
            },
            "optional": {
                "projector_input": (["arcface_normed", "clip_embeds"], {"default": "arcface_normed", "tooltip": "What the projector reads: a face embedding (face adapter) or CLIP image embeds (image adapter)."}),
            },
        }

    def make(self, model, num_tokens, seed, visual_q, projector_input="arcface_normed"):
        from .synthetic import synthetic_adapter

        host = pack_module("nodes.common.host")
        layers = host.cross_attention_layers(model)
        if not layers and pack_module("nodes.common.dit_layout").dit_family(model) is not None:
            # Flux: no layers to give projections to; tokens as wide as its text context (training-free joint use)
            width = pack_module("nodes.common.dit_layout").context_width(model)
            return (synthetic_adapter([], "sd15", width, num_tokens=num_tokens, seed=seed, projector_input=projector_input, mechanism="joint"),)
        base = host.base_model_of(model)
        return (
            synthetic_adapter(
                layers, base, layers[0].context_dim, num_tokens=num_tokens, seed=seed, visual_q=visual_q, projector_input=projector_input
            ),
        )


class AdapterReport:
    NODE_ID = "IdentityAttentionTestKit_AdapterReport"
    DISPLAY_NAME = "Report identity adapter (test kit)"
    CATEGORY = "identity_attention/testkit"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"id_adapter": ("ID_ADAPTER", {"tooltip": "The adapter to describe in the prompt's history."})}}

    def report(self, id_adapter):
        """Format, base, layer count, projector shape and a checksum of every tensor, for host tests."""
        total = sum(float(t.double().sum()) for entries in id_adapter.layers.values() for t in entries.values())
        p = id_adapter.projector
        summary = {
            "format": id_adapter.format,
            "base": id_adapter.base,
            "context_dim": id_adapter.context_dim,
            "layers": sorted([list(k) for k in id_adapter.layers]),
            "projector": None if p is None else [type(p).__name__, p.input_kind, p.num_tokens, p.token_dim],
            "layer_checksum": total,
            "projector_checksum": None if p is None else sum(float(t.double().sum()) for t in p.state_dict().values()),
        }
        return {"ui": {"adapter": [summary]}}


class SyntheticFactAdapter:
    NODE_ID = "IdentityAttentionTestKit_SyntheticFactAdapter"
    DISPLAY_NAME = "Synthetic FACT face adapter (test kit)"
    CATEGORY = "identity_attention/testkit"
    RETURN_TYPES = ("ID_ADAPTER",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The adapter gets FaceChain-FACT-shaped gated self-attention weights for every transformer block of this model."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Weights are a function of this seed."}),
                "alpha": ("FLOAT", {"default": 0.5, "min": -3.0, "max": 3.0, "step": 0.01, "tooltip": "The gates alpha_attn / alpha_dense (around this value)."}),
            }
        }

    def make(self, model, seed, alpha):
        from .synthetic import synthetic_fact_adapter

        host = pack_module("nodes.common.host")
        layers = host.cross_attention_layers(model)
        return (synthetic_fact_adapter(layers, host.base_model_of(model), layers[0].context_dim, seed=seed, alpha=alpha),)


class SyntheticClipVision:
    NODE_ID = "IdentityAttentionTestKit_SyntheticClipVision"
    DISPLAY_NAME = "Synthetic CLIP vision (test kit)"
    CATEGORY = "identity_attention/testkit"
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "The encoder is a function of this seed."})}}

    def make(self, seed):
        from .synthetic import SyntheticClipVision as Encoder

        return (Encoder(seed),)


from .clip_vision import TinyClipVision  # noqa: E402
from .flux_nodes import FLUX_NODES  # noqa: E402

NODES = [TinyModels, DummyStage, HandPatch, ForeignReplace, SyntheticIdentity, SyntheticAdapter, AdapterReport, SyntheticFactAdapter, ImageList, Report, SyntheticClipVision, TinyClipVision, Tensor, DamagedIdentity, Number, *FLUX_NODES]
NODE_CLASS_MAPPINGS = {cls.NODE_ID: cls for cls in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.NODE_ID: cls.DISPLAY_NAME for cls in NODES}
