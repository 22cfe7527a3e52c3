"""Which adapter a weight file holds, and its conversion to one ID_ADAPTER layout.

The format is read from the tensor names AND shapes (and, for the native
format, its header), never from the file name:

| format | recognised by | projector (input) | per-layer tensors |
| --- | --- | --- | --- |
| ip_adapter | ``image_proj.proj.weight`` + ``image_proj.norm.*`` | ImageProjection (clip_embeds) | ``ip_adapter.N.to_k_ip/to_v_ip`` |
| ip_adapter_plus | ``image_proj.latents``, ``proj_in`` input != 512 | PerceiverResampler (clip_hidden) | same |
| ip_adapter_full_face | ``image_proj.proj.{0,2,3}`` (MLP + LayerNorm) | FullFaceProjection (clip_hidden) | same |
| faceid | ``image_proj.proj.{0,2}`` + ``norm``, input 512 | FaceIDProjection (arcface_normed) | same (+ LoRA, reported) |
| faceid_plus | ``image_proj.perceiver_resampler.*`` | FaceIDPlusProjection | same (+ LoRA, reported) |
| instantid | ``image_proj.latents``, ``proj_in`` input 512 | PerceiverResampler (arcface, raw) | same |
| pulid | ``id_adapter.*`` + ``id_adapter_attn_layers.N.id_to_k/id_to_v`` (official), or ``image_proj.{body,mapping_0}.*`` + ``ip_adapter.N.to_k_ip/to_v_ip`` (PuLID_ComfyUI's ``ip-adapter_pulid_sdxl_fp16``) | PuLIDIDEncoder / PuLIDIDFormer | id_to_k/id_to_v or to_k_ip/to_v_ip |
| fact | ``...attn2.processor.alpha_attn`` + ``local_fac_prj.*`` | PerceiverResampler (face_tokens) | the 17 FACT names below |
| pva | ``...attn2.to_visual_q/k/v`` (+ ``transform_network.*``, ``modifier_vec``) | PVATransformNetwork (arcface) | to_q, to_k, to_v |
| native | header ``format: identity_attention`` | from the header | any |

Per-layer names in the ID_ADAPTER: ``to_k`` / ``to_v`` ``[C, D]`` (and PVA's ``to_q``
``[C, C]``; PVA biases, if a file has them, as ``to_q_bias``...). FACT layers keep
the processor's parameter names: ``linear.weight``, ``linear.bias``,
``attn.to_q.weight``, ``attn.to_k.weight``, ``attn.to_v.weight``,
``attn.to_out.0.weight``, ``attn.to_out.0.bias``, ``ff.net.0.proj.weight``,
``ff.net.0.proj.bias``, ``ff.net.2.weight``, ``ff.net.2.bias``, ``norm1.weight``,
``norm1.bias``, ``norm2.weight``, ``norm2.bias``, ``alpha_attn``, ``alpha_dense``,
plus ``ln.weight`` / ``ln.bias`` when the checkpoint has them: FACT moves the
transformer block's ``norm2`` (the LayerNorm before text cross-attention) into
its processor as ``ln``, so a checkpoint saved from the patched UNet carries
that norm's values under ``...attn2.processor.ln.*``.

IP-Adapter-FaceID files also hold the LoRA of the UNet's attention layers
(``ip_adapter.N.to_q_lora.down.weight``...); they are reported in
``extras["lora"]``, not applied: the matching ``*_lora.safetensors`` goes
through ComfyUI's own LoRA loader. FaceID-Plus and PlusV2 have identical
parameters; the loader passes ``faceid_plus_shortcut`` (from the released
file sizes in the manifest, default PlusV2).

:func:`check_against_model` compares an adapter with the MODEL it will patch:
text-context width (768 SD1.5 / 1024 SD2 / 2048 SDXL), layer keys, channels.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

from ..projectors.id_adapter import IdAdapter
from ..weights.layer_tables import BASE_BY_CONTEXT, BASE_NAMES, CONTEXT_DIMS, DIFFUSERS_ORDER, describe, parse_diffusers_attn2, processor_table
from .native_format import from_tensors as native_from_tensors
from .native_format import is_native
from ..projectors.projector_mlp import FaceIDPlusProjection, FaceIDProjection, FullFaceProjection, ImageProjection
from ..projectors.projector_perceiver import PerceiverResampler
from ..projectors.projector_pulid import PuLIDIDEncoder, PuLIDIDFormer, require_eva_note
from ..projectors.projector_pva import PVATransformNetwork
from ..projectors.projectors import build_projector
from ..weights.weight_dtypes import dtype_kind, dtype_name, usable_weights
from ..weights.weight_errors import WeightError

LayerKey = Tuple[str, int, int]

KNOWN_FORMATS = {
    "ip_adapter": "IP-Adapter (sd15 / light / vit-G / sdxl)",
    "ip_adapter_plus": "IP-Adapter plus / plus-face",
    "ip_adapter_full_face": "IP-Adapter full-face",
    "faceid": "IP-Adapter-FaceID (and portrait)",
    "faceid_plus": "IP-Adapter-FaceID-Plus / PlusV2",
    "instantid": "InstantID ip-adapter",
    "pulid": "PuLID (v1, v1.1) for SDXL",
    "fact": "FaceChain-FACT face adapter",
    "pva": "PVA (parallel visual attention) checkpoint",
    "native": "Identity Attention native safetensors",
}

FACT_NAMES = (
    "linear.weight", "linear.bias", "attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight",
    "attn.to_out.0.weight", "attn.to_out.0.bias", "ff.net.0.proj.weight", "ff.net.0.proj.bias",
    "ff.net.2.weight", "ff.net.2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
    "alpha_attn", "alpha_dense",
)
FACT_MOVED_NORM = ("ln.weight", "ln.bias")

_IP_LAYER = re.compile(r"^ip_adapter\.(\d+)\.(.+)$")
_PULID_LAYER = re.compile(r"^id_adapter_attn_layers\.(\d+)\.(.+)$")


def known_formats_text() -> str:
    return "; ".join(f"{name} ({text})" for name, text in KNOWN_FORMATS.items())


def _sub(tensors: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _shape(t: Optional[torch.Tensor]) -> tuple:
    return tuple(t.shape) if t is not None else ()


# --- detection ------------------------------------------------------------------------------------


def _divides(t: Optional[torch.Tensor], norm: Optional[torch.Tensor]) -> bool:
    """``t``'s rows are a whole number of ``norm``-widths (tokens x width); False for shapes that cannot say."""
    rows, width = _shape(t), _shape(norm)
    return len(rows) == 2 and len(width) == 1 and width[0] > 0 and rows[0] % width[0] == 0


def _image_proj_kind(proj: Mapping[str, torch.Tensor]) -> Optional[str]:
    if "perceiver_resampler.proj_in.weight" in proj and "proj.0.weight" in proj and "norm.weight" in proj:
        return "faceid_plus"
    if "latents" in proj and len(_shape(proj.get("proj_in.weight"))) == 2 and len(_shape(proj["latents"])) == 3:
        return "instantid" if proj["proj_in.weight"].shape[1] == 512 else "ip_adapter_plus"
    if {"proj.0.weight", "proj.2.weight", "proj.3.weight"} <= set(proj):
        w0 = _shape(proj["proj.0.weight"])
        if len(w0) == 2 and w0[0] == w0[1]:
            return "ip_adapter_full_face"
    if {"proj.0.weight", "proj.2.weight", "norm.weight"} <= set(proj) and _divides(proj["proj.2.weight"], proj["norm.weight"]):
        return "faceid"
    if {"proj.weight", "norm.weight"} <= set(proj) and _divides(proj["proj.weight"], proj["norm.weight"]):
        return "ip_adapter"
    return None


def _pulid_in_ip_layout(tensors: Mapping[str, torch.Tensor]) -> bool:
    """PuLID_ComfyUI's layout: PuLID's ID encoder under ``image_proj.`` and IP-Adapter's layer names."""
    has_encoder = ("image_proj.body.0.weight" in tensors and "image_proj.mapping_0.0.weight" in tensors) or (
        "image_proj.id_embedding_mapping.0.weight" in tensors and "image_proj.latents" in tensors
    )
    return has_encoder and any(_IP_LAYER.match(k) and k.endswith(".to_k_ip.weight") for k in tensors)


def _refuse_flux_formats(keys) -> None:
    """Flux identity files are not UNet adapters: name them and the node that reads them (wrong-family error)."""
    from ..flux.pulid_flux import is_pulid_flux

    if is_pulid_flux(keys):
        raise WeightError(
            "this is PuLID-Flux (pulid_encoder.* + pulid_ca.*), made for Flux.1 models, not an identity adapter for SD1.5/SD2/SDXL",
            fix="load it with 'Load PuLID-Flux' and connect it to 'Apply PuLID-Flux' with a Flux.1 model",
        )
    from ..flux.flux_ip_adapter import is_xlabs_flux

    if is_xlabs_flux(keys):
        raise WeightError(
            "this is XLabs' Flux IP-Adapter (double_blocks.N.processor.ip_adapter_double_stream_*), made for Flux.1 models, "
            "not an identity adapter for SD1.5/SD2/SDXL",
            fix="load it with 'Load Flux IP-Adapter (XLabs)' and connect it to 'Apply Flux IP-Adapter (XLabs)' with a Flux.1 model",
        )


def refuse_instantx_flux(tensors: Mapping[str, torch.Tensor]) -> None:
    """InstantX's Flux IP-Adapter: recognised and sent to its own nodes ('Load Flux IP-Adapter (InstantX)')."""
    from ..flux.flux_ip_adapter import instantx_refusal, is_instantx_flux

    if is_instantx_flux(tensors):
        raise instantx_refusal()


def detect_format(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> str:
    """The format name (a key of :data:`KNOWN_FORMATS`), or :class:`WeightError` listing the known ones."""
    if is_native(metadata or {}):
        return "native"
    keys = list(tensors)
    if any(_PULID_LAYER.match(k) and k.endswith(".id_to_k.weight") for k in keys) and any(k.startswith("id_adapter.") for k in keys):
        return "pulid"
    if _pulid_in_ip_layout(tensors):
        return "pulid"
    refuse_instantx_flux(tensors)  # before the UNet IP-Adapter kinds: its image_proj looks like an MLP projector
    if any(_IP_LAYER.match(k) and k.endswith(".to_k_ip.weight") for k in keys):
        kind = _image_proj_kind(_sub(tensors, "image_proj."))
        if kind is not None:
            return kind
    if any(".attn2.processor.alpha_attn" in k for k in keys) and any(k.startswith("local_fac_prj.") for k in keys):
        return "fact"
    if any(".attn2.to_visual_q.weight" in k for k in keys):
        return "pva"
    _refuse_flux_formats(keys)
    sample = ", ".join(sorted(keys)[:4])
    raise WeightError(
        f"this file's tensors ({len(keys)}, e.g. {sample}) match none of the identity-adapter formats this pack reads; "
        f"known formats: {known_formats_text()}",
        fix="check that the file is an identity adapter (not a LoRA, ControlNet or full model)",
    )


# --- conversion -----------------------------------------------------------------------------------


def _base_of_context(context_dim: int, what: str) -> str:
    base = BASE_BY_CONTEXT.get(int(context_dim))
    if base is None:
        raise WeightError(f"{what} take a text context of width {context_dim}, which matches no supported base model (768 SD1.5, 1024 SD2, 2048 SDXL)")
    return base


def _indexed_layers(per_index: Dict[int, Dict[str, torch.Tensor]], k_name: str, v_name: str, base: str, family: str) -> Dict[LayerKey, Dict[str, torch.Tensor]]:
    """``{processor index: {name: tensor}}`` -> ``{ComfyUI key: {"to_k", "to_v"}}``, checking every layer is there."""
    table = processor_table(base)
    with_kv = {i for i, entries in per_index.items() if k_name in entries or v_name in entries}
    unknown = sorted(i for i in with_kv if i not in table)
    if unknown:
        raise WeightError(
            f"this {family} file has layer indices {unknown[:6]} that a {BASE_NAMES[base]} UNet does not have "
            f"(it has {len(table)} cross-attention layers, indices 1..{max(table)})",
            fix="the file is damaged or for another model; download it again",
        )
    missing = [i for i in table if k_name not in per_index.get(i, {}) or v_name not in per_index.get(i, {})]
    if missing:
        names = "; ".join(f"{i} ({describe(table[i])})" for i in missing[:5])
        raise WeightError(
            f"this {family} file is missing {len(missing)} of the {len(table)} {BASE_NAMES[base]} cross-attention layers: {names}"
            + (" ..." if len(missing) > 5 else ""),
            fix="the file is incomplete; download it again",
        )
    return {table[i]: {"to_k": per_index[i][k_name], "to_v": per_index[i][v_name]} for i in table}


def _lora_summary(per_index: Dict[int, Dict[str, torch.Tensor]]) -> Optional[dict]:
    names = [(i, n) for i, entries in per_index.items() for n in entries if "_lora." in n]
    if not names:
        return None
    ranks = sorted({int(per_index[i][n].shape[0]) for i, n in names if n.endswith("down.weight")})
    return {
        "tensors": len(names),
        "layers": len({i for i, _ in names}),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "note": "this FaceID file includes the LoRA it was trained with; it is not applied here. Load the matching "
        "*_lora.safetensors with ComfyUI's 'LoraLoaderModelOnly' before this pack's nodes (weight about 0.6-1.0).",
    }


def _check_token_dim(projector, context_dim: int, family: str) -> None:
    if projector.token_dim != context_dim:
        raise WeightError(
            f"this {family} file's token projector makes tokens of width {projector.token_dim} but its layers take {context_dim}",
            fix="the file mixes two models; download it again",
        )


def _convert_ip_family(fmt: str, tensors: Mapping[str, torch.Tensor], hints: Mapping) -> IdAdapter:
    family = KNOWN_FORMATS[fmt]
    per_index: Dict[int, Dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        m = _IP_LAYER.match(key)
        if m:
            per_index[int(m.group(1))][m.group(2)] = value
    first = next(entries["to_k_ip.weight"] for _, entries in sorted(per_index.items()) if "to_k_ip.weight" in entries)
    context_dim = int(first.shape[1])
    base = _base_of_context(context_dim, f"the {family} layers")
    layers = _indexed_layers(per_index, "to_k_ip.weight", "to_v_ip.weight", base, family)

    state = _sub(tensors, "image_proj.")
    extras: Dict[str, object] = {}
    metadata: Dict[str, str] = {}
    if fmt == "ip_adapter":
        projector = build_projector("ImageProjection", ImageProjection.config_from_state(state), state)
    elif fmt == "ip_adapter_plus":
        projector = build_projector("PerceiverResampler", PerceiverResampler.config_from_state(state, "clip_hidden"), state)
    elif fmt == "instantid":
        projector = build_projector("PerceiverResampler", PerceiverResampler.config_from_state(state, "arcface"), state)
        metadata["identity_input"] = "raw ArcFace embedding (insightface 'embedding', antelopev2), as InstantID's pipeline feeds it"
    elif fmt == "ip_adapter_full_face":
        projector = build_projector("FullFaceProjection", FullFaceProjection.config_from_state(state), state)
    elif fmt == "faceid":
        projector = build_projector("FaceIDProjection", FaceIDProjection.config_from_state(state), state)
        metadata["identity_input"] = "L2-normalised ArcFace embedding (insightface 'normed_embedding', buffalo_l), as IP-Adapter-FaceID feeds it"
    elif fmt == "faceid_plus":
        shortcut = bool(hints.get("faceid_plus_shortcut", True))
        projector = build_projector("FaceIDPlusProjection", FaceIDPlusProjection.config_from_state(state, shortcut=shortcut), state)
        metadata["faceid_plus_version"] = ("PlusV2 (shortcut on)" if shortcut else "Plus v1 (no shortcut)") + (
            f" - {hints['faceid_plus_reason']}" if hints.get("faceid_plus_reason") else ""
        )
        metadata["identity_input"] = "L2-normalised ArcFace embedding + CLIP ViT-H hidden states of the face crop"
    else:  # pragma: no cover - detect_format returns only the names above
        raise WeightError(f"no converter for {fmt}")
    _check_token_dim(projector, context_dim, family)
    lora = _lora_summary(per_index)
    if lora:
        extras["lora"] = lora
    return IdAdapter(format=fmt, base=base, context_dim=context_dim, projector=projector, layers=layers, extras=extras, metadata=metadata)


def _convert_pulid(tensors: Mapping[str, torch.Tensor]) -> IdAdapter:
    """Both PuLID layouts: official (``id_adapter.*``, ``id_adapter_attn_layers.N.id_to_k``) and
    PuLID_ComfyUI's (``image_proj.*``, ``ip_adapter.N.to_k_ip``); the layer numbers N are the same
    (the UNet's attention processors in diffusers order, cross-attention at the odd ones)."""
    official = not _pulid_in_ip_layout(tensors)
    pattern, k_name, v_name, prefix = (
        (_PULID_LAYER, "id_to_k.weight", "id_to_v.weight", "id_adapter.") if official else (_IP_LAYER, "to_k_ip.weight", "to_v_ip.weight", "image_proj.")
    )
    per_index: Dict[int, Dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        m = pattern.match(key)
        if m:
            per_index[int(m.group(1))][m.group(2)] = value
    first = next(entries[k_name] for _, entries in sorted(per_index.items()) if k_name in entries)
    context_dim = int(first.shape[1])
    base = _base_of_context(context_dim, "the PuLID layers")
    layers = _indexed_layers(per_index, k_name, v_name, base, KNOWN_FORMATS["pulid"])
    state = _sub(tensors, prefix)
    if "body.0.weight" in state:
        projector = build_projector("PuLIDIDEncoder", PuLIDIDEncoder.config_from_state(state), state)
        version = "v1 (IDEncoder)"
    elif "latents" in state and "id_embedding_mapping.0.weight" in state:
        projector = build_projector("PuLIDIDFormer", PuLIDIDFormer.config_from_state(state), state)
        version = "v1.1 (IDFormer)"
    else:
        raise WeightError(f"this PuLID file's ID encoder ({prefix}*) is neither PuLID v1's IDEncoder nor v1.1's IDFormer", fix="download the file again")
    _check_token_dim(projector, context_dim, "PuLID")
    return IdAdapter(
        format="pulid", base=base, context_dim=context_dim, projector=projector, layers=layers,
        metadata={
            "pulid_version": version, "pulid_layout": "official (id_adapter.*)" if official else "PuLID_ComfyUI (image_proj.* + ip_adapter.*)",
            "requires": require_eva_note(), "identity_input": "raw antelopev2 ArcFace embedding + EVA02-CLIP-L-14-336 features",
        },
    )


def _diffusers_layers(tensors: Mapping[str, torch.Tensor], wanted) -> Dict[LayerKey, Dict[str, torch.Tensor]]:
    layers: Dict[LayerKey, Dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        parsed = parse_diffusers_attn2(key)
        if parsed is None:
            continue
        layer, rest = parsed
        name = wanted(rest)
        if name is not None:
            layers[layer][name] = value
    return dict(layers)


def _check_layer_set(layers: Mapping[LayerKey, dict], base: str, family: str) -> None:
    expected = DIFFUSERS_ORDER[base]
    unknown = [k for k in layers if k not in expected]
    if unknown:
        raise WeightError(f"this {family} file has weights for layers a {BASE_NAMES[base]} UNet does not have: {', '.join(map(describe, unknown[:4]))}")
    missing = [k for k in expected if k not in layers]
    if missing:
        raise WeightError(
            f"this {family} file is missing {len(missing)} of the {len(expected)} {BASE_NAMES[base]} cross-attention layers: "
            + "; ".join(map(describe, missing[:5])) + (" ..." if len(missing) > 5 else ""),
            fix="the file is incomplete; download it again",
        )


def _convert_fact(tensors: Mapping[str, torch.Tensor]) -> IdAdapter:
    def wanted(rest: str) -> Optional[str]:
        if not rest.startswith("processor."):
            return None
        name = rest[len("processor.") :]
        return name if name in FACT_NAMES or name in FACT_MOVED_NORM else None

    layers = _diffusers_layers(tensors, wanted)
    _check_layer_set(layers, "sd15", "FACT")
    for key, entries in layers.items():
        missing = [n for n in FACT_NAMES if n not in entries]
        if missing:
            raise WeightError(f"the FACT layer at {describe(key)} is missing {', '.join(missing)}", fix="the file is incomplete; download it again")
    state = _sub(tensors, "local_fac_prj.")
    projector = build_projector("PerceiverResampler", PerceiverResampler.config_from_state(state, "face_tokens"), state)
    linear_in = {int(e["linear.weight"].shape[1]) for e in layers.values()}
    if linear_in != {projector.token_dim}:
        raise WeightError(f"FACT's per-layer face projections take width {sorted(linear_in)} but its resampler makes {projector.token_dim}")
    moved = all(all(n in e for n in FACT_MOVED_NORM) for e in layers.values())
    return IdAdapter(
        format="fact", base="sd15", context_dim=CONTEXT_DIMS["sd15"], projector=projector, layers=layers,
        extras={"moved_block_norm": moved},
        metadata={"identity_input": "TransFace-S patch tokens (144 x 512) of the masked, aligned 112 px face"},
        mechanism="gated_self_attention",
    )


def _convert_pva(tensors: Mapping[str, torch.Tensor]) -> IdAdapter:
    def wanted(rest: str) -> Optional[str]:
        m = re.fullmatch(r"to_visual_([qkv])\.(weight|bias)", rest)
        if m is None:
            return None
        return f"to_{m.group(1)}" + ("" if m.group(2) == "weight" else "_bias")

    layers = _diffusers_layers(tensors, wanted)
    for key, entries in layers.items():
        missing = [n for n in ("to_q", "to_k", "to_v") if n not in entries]
        if missing:
            raise WeightError(f"the PVA layer at {describe(key)} is missing to_visual_{'/'.join(n[-1] for n in missing)}", fix="the file is incomplete; download it again")
    context_dim = int(next(iter(layers.values()))["to_k"].shape[1])
    base = _base_of_context(context_dim, "the PVA layers")
    _check_layer_set(layers, base, "PVA")
    state = _sub(tensors, "transform_network.")
    projector = None
    metadata = {"identity_input": "raw ArcFace embeddings of all references (PVA used ms1mv3 ArcFace r50)"}
    if state:
        projector = build_projector("PVATransformNetwork", PVATransformNetwork.config_from_state(state), state)
        _check_token_dim(projector, context_dim, "PVA")
    else:
        metadata["note"] = "this PVA file has no transform_network (a per-identity fine-tune keeps it frozen); combine it with the stage-1 file that has one"
    extras: Dict[str, object] = {}
    modifier = [v for k, v in tensors.items() if k == "modifier_vec" or k.startswith("modifier_vec.") or k.startswith("modifier_token.")]
    if modifier:
        extras["modifier_vec"] = modifier[0]
    return IdAdapter(format="pva", base=base, context_dim=context_dim, projector=projector, layers=layers, extras=extras, metadata=metadata, mechanism="joint")


def convert(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None, source: str = "", hints: Optional[Mapping] = None) -> IdAdapter:
    """Detect the format of a state dict and convert it to an :class:`IdAdapter`.

    ``hints``: settings that no tensor records (``faceid_plus_shortcut``, ``faceid_plus_reason``).
    """
    tensors = usable_weights(tensors, what=f"'{source}'" if source else "the adapter file")  # float8 -> float32; complex, bool, integers refused by name
    fmt = detect_format(tensors, metadata)
    hints = hints or {}
    try:
        if fmt == "native":
            adapter = native_from_tensors(tensors, metadata or {}, source=source)
        elif fmt == "pulid":
            adapter = _convert_pulid(tensors)
        elif fmt == "fact":
            adapter = _convert_fact(tensors)
        elif fmt == "pva":
            adapter = _convert_pva(tensors)
        else:
            adapter = _convert_ip_family(fmt, tensors, hints)
    except WeightError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, RuntimeError, ZeroDivisionError, StopIteration) as err:
        # the loader's contract is WeightError only: a file that matched a format's key names but not its
        # layout (a missing or reshaped tensor the converter reads) is a damaged file, not a crash
        detail = str(err).splitlines()[0][:200] if str(err) else ""
        raise WeightError(
            f"this file has the key names of {KNOWN_FORMATS[fmt]} but its tensors do not fit that layout ({type(err).__name__}: {detail})",
            fix="the file is damaged or was edited; download it again",
        ) from None
    if source:
        adapter.metadata.setdefault("source", source)
    check_weights_usable(adapter)
    return adapter


def _named_tensors(adapter: IdAdapter):
    for key, entries in adapter.layers.items():
        for name, t in entries.items():
            yield f"{describe(key)} {name}", t
    if adapter.projector is not None:
        for name, t in adapter.projector.state_dict().items():
            yield f"projector {name}", t
    for name, t in adapter.extras.items():
        if isinstance(t, torch.Tensor):
            yield f"extra {name}", t


def check_weights_usable(adapter: IdAdapter) -> None:
    """Refuse an adapter with integer tensors or NaN / inf weights (a damaged file, or a training run that diverged).

    Such weights would not fail here but in the middle of sampling, or not at all:
    every picture would come out black or as noise. One pass over the tensors when a
    file is loaded (the loader caches the result).
    """
    named = list(_named_tensors(adapter))
    integer = [(name, t.dtype) for name, t in named if dtype_kind(t.dtype) not in ("float", "float8")]
    if integer:
        kinds = {"integer": "integers", "bool": "true/false values", "complex": "complex numbers"}
        name, dtype = integer[0]
        raise WeightError(
            f"{len(integer)} of the adapter's weight tensors hold {kinds.get(dtype_kind(dtype), dtype_name(dtype) + ' values')}, "
            f"not weights (first: {name} ({dtype_name(dtype)}))",
            fix="the file is damaged or is not an identity adapter; download it again",
        )
    bad = [name for name, t in named if t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        raise WeightError(
            f"{len(bad)} of the adapter's tensors hold NaN or infinite values (first: {bad[0]}); every picture would be black or noise",
            fix="download the file again; if it came from a training run, take an earlier checkpoint",
        )


# --- the MODEL it will patch ----------------------------------------------------------------------


def layer_channels(entries: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The layer width C an adapter layer's tensors expect (None when no tensor tells)."""
    for name in ("to_k", "to_v", "to_q", "linear.weight", "norm1.weight"):
        t = entries.get(name)
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return None


def check_against_model(adapter: IdAdapter, model_layers: Iterable, model_label: Optional[str] = None) -> None:
    """Raise :class:`WeightError` when ``adapter`` does not fit a MODEL.

    ``model_layers``: the MODEL's cross-attention layers (objects with ``key``,
    ``inner_dim``, ``context_dim``, e.g. ``nodes.common.host.LayerInfo``).
    """
    layers = {tuple(info.key): info for info in model_layers}
    if not layers:
        raise WeightError("the MODEL has no cross-attention layers, so no identity adapter can patch it")
    model_context = next(iter(layers.values())).context_dim
    model_base = BASE_BY_CONTEXT.get(model_context)
    model_name = model_label or (f"{BASE_NAMES[model_base]}" if model_base else "an unknown model")
    adapter_name = BASE_NAMES.get(adapter.base, adapter.base)
    if adapter.context_dim != model_context:
        raise WeightError(
            f"this adapter is for {adapter_name} (text context {adapter.context_dim}) but the MODEL is {model_name} (text context {model_context})",
            fix=f"load a {BASE_NAMES.get(model_base, 'matching')} adapter, or use an {adapter_name} checkpoint",
        )
    if not adapter.layers:
        return
    extra = [k for k in adapter.layers if k not in layers]
    if extra:
        raise WeightError(
            f"this {adapter_name} adapter has weights for {len(extra)} layers the MODEL ({model_name}) does not have: "
            + "; ".join(map(describe, extra[:4])),
            fix="use a MODEL of the architecture the adapter was made for",
        )
    missing = [k for k in layers if k not in adapter.layers]
    if missing:
        raise WeightError(
            f"this adapter has no weights for {len(missing)} of the MODEL's {len(layers)} cross-attention layers: "
            + "; ".join(map(describe, missing[:4])) + (" ..." if len(missing) > 4 else ""),
            fix="the adapter is incomplete or made for a different architecture",
        )
    for key, info in layers.items():
        channels = layer_channels(adapter.layers[key])
        if channels is not None and channels != info.inner_dim:
            raise WeightError(
                f"at {describe(key)} the adapter's weights have {channels} channels but the MODEL's layer has {info.inner_dim} "
                f"(adapter: {adapter_name}; MODEL: {model_name})",
                fix="use a MODEL of the architecture the adapter was made for",
            )
