"""API-format prompts that run every attention mechanism of the pack on the tiny models.

One builder, :func:`mechanism_prompt`, for the reliability tests (isolation,
interruption, concurrency, bad inputs): a :class:`Config` names the
architecture, the mechanism (or ``"all"`` stacked, or ``"plain"``), seeds and
sizes; the prompt ends in a SaveLatent. Every node id starts with ``tag`` so a
test can give each queued prompt node ids of its own (on hosts whose output
cache is keyed by node id, new ids make every node run again).

Mechanisms and what stands in for real inputs (test-kit nodes, no files
except ``loaded_adapter``):

=================  ==================================================================
plain              no patch
pva_joint          Apply parallel visual attention, joint, adapter with to_q (PVA)
pva_decoupled      the same, decoupled (IP-Adapter style), 2 references per_reference
loaded_adapter     decoupled, with a FaceID file read by Load identity adapter
kv_mixed           Apply KV-mixed attention (4 key tokens, 16 value tokens resampled)
moa                parallel attention + Apply mixture-of-attention (identity router)
ca2                Apply CA² gate on an inpainting latent (synthetic CLIP vision)
stfg               Apply STFG guidance on an inpainting latent
face_adapter       Apply face adapter (FACT-shaped synthetic weights, face tokens)
stage_tokens       Create identity tokens -> Encode prompt -> Apply per-stage tokens
nested             Apply nested attention (adapter K/V, token index 5)
all                every one of the above stacked on one MODEL
=================  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

MECHANISMS = (
    "pva_joint",
    "pva_decoupled",
    "loaded_adapter",
    "kv_mixed",
    "moa",
    "ca2",
    "stfg",
    "face_adapter",
    "stage_tokens",
    "nested",
)
ALL = "all"
PLAIN = "plain"
INPAINTING = {"ca2", "stfg", ALL}
LOADED_ADAPTER_FILE = {"sd15": "reliability_faceid_sd15.safetensors", "sdxl": "reliability_faceid_sdxl.safetensors"}
PROMPT_TEXT = "a photo of V* person, smiling"
PLAIN_TEXT = "a photo of a person, smiling"


@dataclass(frozen=True)
class Config:
    """One distinct prompt. ``seed``: the sampler's; ``adapter_seed``: the synthetic weights' / identity's."""

    arch: str = "sd15"
    mechanism: str = PLAIN
    seed: int = 1
    weight: float = 0.8
    adapter_seed: int = 2
    size: int = 32
    steps: int = 2
    cfg: float = 4.0
    inpaint: Optional[bool] = None  # None: an inpainting latent exactly when a mechanism needs one (CA², STFG)

    def with_(self, **changes) -> "Config":
        return replace(self, **changes)

    @property
    def name(self) -> str:
        inpaint = "-inpaint" if self.inpaint and self.mechanism not in INPAINTING else ""
        return f"{self.arch}-{self.mechanism}{inpaint}-w{self.weight:g}-a{self.adapter_seed}-s{self.seed}-n{self.steps}"

    def unpatched(self) -> "Config":
        """The same prompt without any patch (same seed, same kind of latent)."""
        return replace(self, mechanism=PLAIN, inpaint=self.mechanism in INPAINTING)


class _Builder:
    def __init__(self, tag: str):
        self.tag = tag
        self.nodes: Dict[str, dict] = {}

    def add(self, name: str, class_type: str, **inputs) -> str:
        node_id = f"{self.tag}{name}"
        assert node_id not in self.nodes, node_id
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    def out(self, name: str, index: int = 0):
        return [f"{self.tag}{name}", index]


def _window(weight: float) -> dict:
    return {"weight": weight, "start_percent": 0.0, "end_percent": 1.0}


def mechanism_prompt(config: Config, tag: str = "", prefix: str = "reliability") -> Tuple[dict, Dict[str, str]]:
    """The prompt for ``config`` and the ids of its main nodes (``sampler``, ``save``, ``models``...)."""
    c = config
    mechs = set(MECHANISMS) if c.mechanism == ALL else ({c.mechanism} - {PLAIN})
    unknown = mechs - set(MECHANISMS)
    assert not unknown, f"unknown mechanism {unknown}"
    b = _Builder(tag)
    b.add("models", "IdentityAttentionTestKit_TinyModels", arch=c.arch, seed=0)
    clip, vae = b.out("models", 1), b.out("models", 2)
    model = b.out("models", 0)
    b.add("pos", "CLIPTextEncode", clip=clip, text=PLAIN_TEXT)
    b.add("neg", "CLIPTextEncode", clip=clip, text="blurry, lowres")
    positive = b.out("pos")
    s = c.adapter_seed

    # -- identity inputs shared by several mechanisms
    if mechs & {"pva_joint", "pva_decoupled", "kv_mixed", "moa", "nested", "loaded_adapter"}:
        b.add("identity", "IdentityAttentionTestKit_SyntheticIdentity", references=2, seed=s, with_clip=False, with_face_tokens=False)
        b.add("adapter", "IdentityAttentionTestKit_SyntheticAdapter", model=b.out("models"), num_tokens=4, seed=s + 1, visual_q=True)

    # -- inpainting latent (CA² / STFG) or an empty one
    if (mechs & INPAINTING) if c.inpaint is None else c.inpaint:
        b.add("photo", "EmptyImage", width=c.size, height=c.size, batch_size=1, color=0xC08060)
        b.add("original", "VAEEncode", pixels=b.out("photo"), vae=vae)
        b.add("blank", "SolidMask", value=0.0, width=c.size, height=c.size)
        b.add("hole", "SolidMask", value=1.0, width=c.size // 2, height=c.size // 2)
        b.add("mask", "MaskComposite", destination=b.out("blank"), source=b.out("hole"), x=c.size // 4, y=c.size // 4, operation="add")
        b.add("latent", "SetLatentNoiseMask", samples=b.out("original"), mask=b.out("mask"))
    else:
        b.add("latent", "EmptyLatentImage", width=c.size, height=c.size, batch_size=1)

    w = c.weight
    if "face_adapter" in mechs:
        b.add("face_identity", "IdentityAttentionTestKit_SyntheticIdentity", references=2, seed=s + 2, with_clip=False, with_face_tokens=True)
        b.add("fact_adapter", "IdentityAttentionTestKit_SyntheticFactAdapter", model=b.out("models"), seed=s + 3, alpha=0.5)
        b.add(
            "face_adapter", "IdentityAttentionApplyFaceAdapter", model=model, adapter=b.out("fact_adapter"), identity=b.out("face_identity"),
            apply_to="both", references="per_reference", **_window(w),
        )
        model = b.out("face_adapter")
    if "stage_tokens" in mechs:
        b.add("tokens", "IdentityAttentionCreateIdentityTokens", base=c.arch, init="seed", init_word="person", seed=s + 4, stages=5, vectors=1, noise=0.0, clip=clip)
        b.add("token_prompt", "IdentityAttentionEncodePromptWithIdentityTokens", clip=clip, tokens=b.out("tokens"), text=PROMPT_TEXT, placeholder="V*", class_word="")
        positive = b.out("token_prompt", 0)
        b.add("stage_tokens", "IdentityAttentionApplyStageTokens", model=model, stage_contexts=b.out("token_prompt", 1), stage_boundaries="0.2, 0.4, 0.6, 0.8", **_window(w))
        model = b.out("stage_tokens")
    if "pva_joint" in mechs:
        b.add(
            "pva_joint", "IdentityAttentionApplyParallelAttention", model=model, id_adapter=b.out("adapter"), identity=b.out("identity"),
            apply_to="both", mode="joint", projections="adapter", references="fused", **_window(w),
        )
        model = b.out("pva_joint")
    if "pva_decoupled" in mechs:
        b.add(
            "pva_decoupled", "IdentityAttentionApplyParallelAttention", model=model, id_adapter=b.out("adapter"), identity=b.out("identity"),
            apply_to="both", mode="decoupled", projections="adapter", references="per_reference", **_window(w),
        )
        model = b.out("pva_decoupled")
    if "loaded_adapter" in mechs:
        b.add("loaded", "IdentityAttentionLoadIdentityAdapter", adapter=f"ipadapter/{LOADED_ADAPTER_FILE[c.arch]}", model=b.out("models"), verify_sha256=False)
        b.add(
            "loaded_adapter", "IdentityAttentionApplyParallelAttention", model=model, id_adapter=b.out("loaded"), identity=b.out("identity"),
            apply_to="both", mode="decoupled", projections="adapter", references="fused", **_window(w),
        )
        model = b.out("loaded_adapter")
    if "kv_mixed" in mechs:
        b.add("value_adapter", "IdentityAttentionTestKit_SyntheticAdapter", model=b.out("models"), num_tokens=16, seed=s + 5, visual_q=False)
        b.add(
            "kv_mixed", "IdentityAttentionApplyKVMixedAttention", model=model, key_adapter=b.out("adapter"), key_identity=b.out("identity"),
            value_adapter=b.out("value_adapter"), value_identity=b.out("identity"), apply_to="both", mode="decoupled",
            token_mismatch="resample_values", projections="adapter", references="fused", pairing="two adapters (unrelated tokens, experimental)", **_window(w),
        )
        model = b.out("kv_mixed")
    if "moa" in mechs:
        if "pva_joint" not in mechs:  # MoA routes the identity attention applied before it
            b.add(
                "moa_identity", "IdentityAttentionApplyParallelAttention", model=model, id_adapter=b.out("adapter"), identity=b.out("identity"),
                apply_to="both", mode="joint", projections="adapter", references="fused", **_window(w),
            )
            model = b.out("moa_identity")
        b.add(
            "moa", "IdentityAttentionApplyMixtureOfAttention", model=model, router="identity_attention", apply_to="both",
            temperature=1.0, record_maps=True, **_window(min(w, 1.0)),
        )
        model = b.out("moa")
    if "nested" in mechs:
        b.add(
            "nested", "IdentityAttentionApplyNestedAttention", model=model, adapter=b.out("adapter"), identity=b.out("identity"),
            projection="adapter K/V (to_k, to_v)", subject="token index", token_index=5, apply_to="cond", references="fused", **_window(w),
        )
        model = b.out("nested")
    if "ca2" in mechs:
        b.add("image_adapter", "IdentityAttentionTestKit_SyntheticAdapter", model=b.out("models"), num_tokens=4, seed=s + 6, visual_q=False, projector_input="clip_embeds")
        b.add("clip_vision", "IdentityAttentionTestKit_SyntheticClipVision", seed=s + 7)
        b.add(
            "ca2", "IdentityAttentionApplyCA2Gate", model=model, id_adapter=b.out("image_adapter"), mask=b.out("mask"),
            score_source="text attention (training-free)", sharpness=1.0, apply_to="both", clip_vision=b.out("clip_vision"), image=b.out("photo"), **_window(w),
        )
        model = b.out("ca2")
    if "stfg" in mechs:
        b.add(
            "stfg", "IdentityAttentionApplySTFG", model=model, original_latent=b.out("original"), mask=b.out("mask"),
            strength=10.0 * w, mode="fast", band=0.5, start_percent=0.0, end_percent=1.0,
        )
        model = b.out("stfg")

    b.add(
        "sampler", "KSampler", model=model, seed=c.seed, steps=c.steps, cfg=c.cfg, sampler_name="euler", scheduler="normal",
        positive=positive, negative=b.out("neg"), latent_image=b.out("latent"), denoise=1.0,
    )
    b.add("save", "SaveLatent", samples=b.out("sampler"), filename_prefix=f"latents/{prefix}_{c.name}")
    ids = {name: f"{tag}{name}" for name in ("models", "sampler", "save")}
    return b.nodes, ids


def write_loaded_adapter_files(models_dir) -> None:
    """The FaceID files ``loaded_adapter`` reads, in ``models/ipadapter/`` (tiny-model channels)."""
    from safetensors.torch import save_file

    import weight_fixtures as wf

    folder = models_dir / "ipadapter"
    folder.mkdir(parents=True, exist_ok=True)
    for arch, name in LOADED_ADAPTER_FILE.items():
        path = folder / name
        if not path.exists():
            state, _ = wf.ip_family_state("faceid", arch, seed=5)
            save_file(state, str(path))
