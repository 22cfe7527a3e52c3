"""What a scenario hands a node besides the MODEL: synthetic stand-ins for an artist's inputs.

A scenario patches the model by calling the mechanism node's own ``FUNCTION``
(:func:`apply_node`) with every input the artist did not set at the node's own
default (read from its ``INPUT_TYPES``, so a changed default is benchmarked as
shipped). What an artist would connect comes from :class:`BenchContext`:

- IDENTITY: ``tests/testkit/synthetic.py`` (random faces, CLIP features, TransFace-shaped face
  tokens ``[1, 144, 512]``), one reference;
- ID_ADAPTER: random per-layer ``to_k`` / ``to_v`` (``to_q`` for PVA) at the model's real layer
  sizes. The layer weights are drawn once per model and shared by every adapter variant (a
  variant differs in token count, projector input, format and mechanism), because a full-size
  SDXL set takes ~10 s of CPU to draw; FACT-shaped weights (16 C² per layer, 1.8 G values at
  full-size SDXL: a minute of one CPU core) are drawn on the benchmark device in its dtype;
- CLIP: the test kit's tiny text encoder behind the host's real tokenizers
  (``tiny_models.build_clip``), so nodes that encode or tokenize a prompt do it for real;
  CLIP_VISION: ``SyntheticClipVision`` (ComfyUI's output fields and shapes);
- the inpainting inputs of CA² / STFG: an edit mask (the centre half of each side, pixel
  size), an original image (smooth random RGB) and its latent (smooth random, VAE scale).

``BenchContext.cache`` may be shared by every configuration of one model
(``run.py`` does): keys that depend on the latent size carry it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from .geometry import LayerGeometry
from .host_setup import pack

EDIT_PROMPT = "a photo of a person"  # nested attention's subject: its last word token
STAGE_TOKEN_PROMPT = "a photo of V* person"  # EncodePromptWithIdentityTokens' default text


def node_defaults(node_cls) -> Dict[str, object]:
    """Every input of ``node_cls`` that has a default, at that default (a list input: its ``default`` or first item)."""
    spec = node_cls.INPUT_TYPES()
    out: Dict[str, object] = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind = entry[0]
            options = entry[1] if len(entry) > 1 else {}
            if isinstance(kind, (list, tuple)):
                out[name] = options.get("default", kind[0] if kind else None)
            elif "default" in options:
                out[name] = options["default"]
    return out


def call_node(node_cls, **inputs) -> tuple:
    """``node_cls().FUNCTION(**inputs)`` with every input not given at the node's default: all outputs."""
    args = {**node_defaults(node_cls), **inputs}
    return getattr(node_cls(), node_cls.FUNCTION)(**args)


def apply_node(node_cls, **inputs):
    """:func:`call_node`'s first output (a patch node's MODEL)."""
    return call_node(node_cls, **inputs)[0]


@dataclass
class BenchContext:
    """What a scenario body may use. One per (architecture, latent size); ``cache`` may be per model."""

    arch: str  # "sd15" | "sdxl"
    device: torch.device
    dtype: torch.dtype
    latent: torch.Tensor  # [1, 4, h, w], what is being sampled
    table: List[LayerGeometry]
    cache: Dict[tuple, object] = field(default_factory=dict)

    @property
    def latent_hw(self) -> Tuple[int, int]:
        return tuple(self.latent.shape[-2:])

    @property
    def pixel_hw(self) -> Tuple[int, int]:
        h, w = self.latent_hw
        return h * 8, w * 8

    def _cached(self, key: tuple, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def layers(self, model):
        """The model's cross-attention layers (``nodes.common.host.LayerInfo``)."""
        return pack("nodes.common.host").cross_attention_layers(model)

    def _base(self, model) -> Tuple[str, int]:
        context_dim = self.layers(model)[0].context_dim
        return pack("nodes.common.host").BASE_BY_CONTEXT_DIM.get(context_dim, "sd15"), context_dim

    # --- identity and adapters -------------------------------------------------------------------

    def identity(self, references: int = 1):
        """A synthetic IDENTITY (random faces, CLIP features and face tokens of the usual shapes)."""

        def make():
            from testkit.synthetic import synthetic_identity

            return synthetic_identity(references=references, seed=0, face_tokens=True)

        return self._cached(("identity", references), make)

    def adapter(self, model, num_tokens: int = 4, visual_q: bool = False, projector: str = "arcface_normed", fmt: str = "ip_adapter", mechanism: str = "decoupled"):
        """A synthetic ID_ADAPTER: random ``to_k`` / ``to_v`` (and ``to_q``) at every layer of ``model``.

        projector: what its token projector reads, "arcface_normed" (a face adapter: FaceID,
        InstantID, PVA) or "clip_embeds" (an image adapter: IP-Adapter, the CA² condition).
        """

        def layers_only():
            from testkit.synthetic import synthetic_adapter

            base, context_dim = self._base(model)
            return synthetic_adapter(self.layers(model), base, context_dim, num_tokens=1, visual_q=visual_q)

        def make():
            from testkit.synthetic import synthetic_clip_projector, synthetic_projector

            shared = self._cached(("adapter layers", visual_q), layers_only)
            token_dim = shared.context_dim
            tokens = synthetic_clip_projector(num_tokens, token_dim) if projector == "clip_embeds" else synthetic_projector(num_tokens, token_dim)
            return dataclasses.replace(shared, projector=tokens, format=fmt, mechanism=mechanism)

        return self._cached(("adapter", num_tokens, visual_q, projector, fmt, mechanism), make)

    def fact_adapter(self, model, num_tokens: int = 16):
        """A FaceChain-FACT-shaped ID_ADAPTER (released key names, random values) for every layer of ``model``.

        The layers are ``testkit.synthetic.fact_layer_weights``, drawn on the benchmark
        device in its dtype (the patch casts them to the call's dtype once per layer anyway).
        """

        def make():
            from testkit.synthetic import fact_layer_weights, synthetic_face_token_projector

            base, context_dim = self._base(model)
            gen = torch.Generator(device=self.device).manual_seed(11)
            with torch.device(self.device):  # fact_layer_weights draws with the generator on its device
                layers = {info.key: fact_layer_weights(info.inner_dim, context_dim, gen, 0.5, self.dtype) for info in self.layers(model)}
            return pack("adapters.projectors.id_adapter").IdAdapter(
                format="fact",
                base=base,
                context_dim=context_dim,
                projector=synthetic_face_token_projector(num_tokens, context_dim),
                layers=layers,
                metadata={"source": "synthetic FACT-shaped benchmark adapter"},
                mechanism="gated_self_attention",
            )

        return self._cached(("fact adapter", num_tokens), make)

    # --- encoders ------------------------------------------------------------------------------

    def text_encoder(self):
        """A CLIP: the test kit's tiny text encoder in the host's ``comfy.sd.CLIP`` (real tokenizers)."""

        def make():
            from testkit.tiny_models import build_clip

            return build_clip(self.arch)

        return self._cached(("clip",), make)

    def clip_vision(self):
        """A CLIP_VISION stand-in with ComfyUI's output fields (``image_embeds`` [B, 1024], hidden [B, 257, 1280])."""

        def make():
            from testkit.synthetic import SyntheticClipVision

            return SyntheticClipVision(0)

        return self._cached(("clip vision",), make)

    # --- an inpainting edit (CA², STFG) -------------------------------------------------------------

    def edit_mask(self) -> torch.Tensor:
        """MASK ``[1, H, W]`` at pixel size: 1 on the centre half of each side (the face being edited)."""

        def make():
            h, w = self.pixel_hw
            mask = torch.zeros(1, h, w)
            mask[:, h // 4 : h - h // 4, w // 4 : w - w // 4] = 1.0
            return mask

        return self._cached(("edit mask", self.latent_hw), make)

    def noise_mask(self) -> torch.Tensor:
        """The edit mask as KSampler's ``noise_mask`` ``[1, 1, H, W]`` (SetLatentNoiseMask's layout)."""
        return self.edit_mask().reshape(1, 1, *self.pixel_hw)

    def original_image(self) -> torch.Tensor:
        """IMAGE ``[1, H, W, 3]`` in [0, 1]: smooth random colour fields (the photo being edited)."""

        def make():
            gen = torch.Generator().manual_seed(21)
            coarse = torch.rand(1, 3, 4, 4, generator=gen)
            return torch.nn.functional.interpolate(coarse, size=self.pixel_hw, mode="bilinear", align_corners=False).movedim(1, -1).contiguous()

        return self._cached(("original image", self.latent_hw), make)

    def original_latent(self) -> torch.Tensor:
        """LATENT samples ``[1, 4, h, w]`` at VAE scale: smooth colour fields plus a little texture (its VAE encoding)."""

        def make():
            gen = torch.Generator().manual_seed(22)
            coarse = torch.randn(1, 4, 4, 4, generator=gen) * 3.0
            smooth = torch.nn.functional.interpolate(coarse, size=self.latent_hw, mode="bicubic", align_corners=False)
            return smooth + 0.2 * torch.randn(1, 4, *self.latent_hw, generator=gen)

        return self._cached(("original latent", self.latent_hw), make)
