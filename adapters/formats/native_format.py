"""The pack's own weight format: one safetensors file with a metadata header.

Written for adapters this pack trains or converts, and for mechanisms with no
public weights (MoA routers, CA2 score MLPs, nested-attention projections,
per-stage tokens...), so per-layer names are free-form.

Tensors::

    layers.<block>.<id>.<index>.<name>   one ID_ADAPTER layer tensor, e.g. layers.input.4.1.to_k,
                                         layers.middle.0.0.attn.to_q.weight (<name> may contain dots)
    projector.<parameter>                the token projector's state dict
    extras.<name>                        tensor extras (PVA's modifier_vec...)

Header (``__metadata__``, all strings)::

    format        "identity_attention"           marks the file as this format
    version       "1"
    base          "sd15" | "sd2" | "sdxl" | "flux"
    mechanism     what the weights were trained for ("decoupled", "joint", "gated_self_attention", ...)
    source_format the format the adapter was converted from ("native" when trained here)
    context_dim   text-context width of the base model, e.g. "768"
    num_tokens    tokens the projector makes ("0" without projector)
    token_dim     their width
    projector     JSON {"class": <projectors.PROJECTORS name>, "config": {...}} or "null"
    extras        JSON of the non-tensor extras
    metadata      JSON of the adapter's metadata strings

:func:`read_native` returns ``IdAdapter(format="native", mechanism=<header>)``
with the projector rebuilt from ``projector`` and the ``projector.*`` tensors.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Tuple

import torch

from ..projectors.id_adapter import BASES, IdAdapter
from ..projectors.projectors import build_projector, projector_name
from ..weights.weight_dtypes import usable_weights
from ..weights.weight_errors import WeightError

MARKER = "identity_attention"
VERSION = "1"
BLOCKS = ("input", "middle", "output")


def _json_extras(extras: Mapping) -> Tuple[Dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for name, value in extras.items():
        if isinstance(value, torch.Tensor):
            tensors[f"extras.{name}"] = value
        else:
            try:
                json.dumps(value)
            except TypeError:
                raise WeightError(f"the adapter extra {name!r} ({type(value).__name__}) cannot be stored in a native file") from None
            plain[name] = value
    return tensors, plain


def to_tensors(adapter: IdAdapter) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The tensors and header of ``adapter`` in the native layout."""
    tensors: Dict[str, torch.Tensor] = {}
    for (block, block_id, index), entries in adapter.layers.items():
        if block not in BLOCKS:
            raise WeightError(f"layer key {(block, block_id, index)} has an unknown block name")
        for name, value in entries.items():
            tensors[f"layers.{block}.{int(block_id)}.{int(index)}.{name}"] = value
    projector = "null"
    if adapter.projector is not None:
        projector = json.dumps({"class": projector_name(adapter.projector), "config": adapter.projector.config}, sort_keys=True)
        for name, value in adapter.projector.state_dict().items():
            tensors[f"projector.{name}"] = value
    extra_tensors, extras = _json_extras(adapter.extras)
    tensors.update(extra_tensors)
    header = {
        "format": MARKER,
        "version": VERSION,
        "base": adapter.base,
        "mechanism": adapter.mechanism,
        "source_format": adapter.format if adapter.format != "native" else adapter.metadata.get("source_format", "native"),
        "context_dim": str(adapter.context_dim),
        "num_tokens": str(adapter.projector.num_tokens if adapter.projector is not None else 0),
        "token_dim": str(adapter.token_dim),
        "projector": projector,
        "extras": json.dumps(extras, sort_keys=True),
        "metadata": json.dumps({k: str(v) for k, v in adapter.metadata.items()}, sort_keys=True),
    }
    return tensors, header


def _unshared(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (views): give each its own."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
            storage = t.untyped_storage()
        seen.add(storage.data_ptr())
        out[name] = t
    return out


def write_native(adapter: IdAdapter, path: str) -> None:
    """Save ``adapter`` to ``path`` (a fresh temporary file in its folder, then renamed: :func:`.write_paths.write_atomically`)."""
    from ..weights.write_paths import write_safetensors

    tensors, header = to_tensors(adapter)
    write_safetensors(path, _unshared(tensors), metadata=header)


def is_native(metadata: Mapping[str, str]) -> bool:
    return (metadata or {}).get("format") == MARKER


def _int(header: Mapping[str, str], key: str) -> int:
    try:
        return int(header[key])
    except (KeyError, ValueError):
        raise WeightError(f"the native file's header has no valid '{key}'", fix="save the adapter again") from None


MAX_JSON_FIELD = 1024**2  # the pack writes a few hundred characters per field


def _json(header: Mapping[str, str], key: str, default):
    text = header.get(key)
    if text is None:
        return default
    if len(text) > MAX_JSON_FIELD:
        raise WeightError(f"the native file's header field '{key}' is {len(text):,} characters, over {MAX_JSON_FIELD:,}", fix="save the adapter again")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # bad JSON, integers over Python's digit limit, nesting bombs
        raise WeightError(f"the native file's header field '{key}' is not valid JSON", fix="save the adapter again") from None


def _json_table(header: Mapping[str, str], key: str) -> dict:
    value = _json(header, key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WeightError(f"the native file's header field '{key}' is not a JSON object", fix="save the adapter again")
    return value


def from_tensors(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], source: str = "") -> IdAdapter:
    """Build the ID_ADAPTER of a native file from its tensors and header."""
    if not is_native(header):
        raise WeightError("this is not an Identity Attention native file (no 'format: identity_attention' in its header)")
    if header.get("version") != VERSION:
        raise WeightError(f"native format version {header.get('version')!r} is not supported (this pack reads version {VERSION})", fix="update the pack")
    base = header.get("base")
    if base not in BASES:
        raise WeightError(f"the native file's header names the base model {base!r}; known: {', '.join(BASES)}")
    layers: Dict[Tuple[str, int, int], Dict[str, torch.Tensor]] = {}
    projector_state: Dict[str, torch.Tensor] = {}
    extras: Dict[str, object] = dict(_json_table(header, "extras"))
    for key, value in tensors.items():
        group, _, rest = key.partition(".")
        if group == "layers":
            parts = rest.split(".", 3)
            if len(parts) != 4 or parts[0] not in BLOCKS or not parts[1].isdigit() or not parts[2].isdigit():
                raise WeightError(f"the tensor name {key!r} is not layers.<block>.<id>.<index>.<name>")
            layers.setdefault((parts[0], int(parts[1]), int(parts[2])), {})[parts[3]] = value
        elif group == "projector":
            projector_state[rest] = value
        elif group == "extras":
            extras[rest] = value
        else:
            raise WeightError(f"the tensor name {key!r} belongs to no part of a native file (layers., projector., extras.)")
    spec = _json(header, "projector", None)
    projector = None
    if spec is not None:
        if not isinstance(spec, dict) or "class" not in spec:
            raise WeightError("the native file's 'projector' header field has no 'class'")
        projector = build_projector(spec["class"], spec.get("config") or {}, projector_state)
        if projector.num_tokens != _int(header, "num_tokens") or projector.token_dim != _int(header, "token_dim"):
            raise WeightError(
                f"the header says {header.get('num_tokens')} tokens of {header.get('token_dim')} but the stored projector makes "
                f"{projector.num_tokens} of {projector.token_dim}",
                fix="save the adapter again",
            )
    elif projector_state:
        raise WeightError("the native file has projector tensors but no 'projector' header field")
    metadata = {str(k): str(v) for k, v in _json_table(header, "metadata").items()}
    metadata["source_format"] = header.get("source_format", "native")
    if source:
        metadata["source"] = source
    return IdAdapter(
        format="native",
        base=base,
        context_dim=_int(header, "context_dim"),
        projector=projector,
        layers=layers,
        extras=extras,
        metadata=metadata,
        mechanism=header.get("mechanism") or "decoupled",
    )


def read_native(path: str) -> IdAdapter:
    """Read a native file from disk (through :mod:`safe_load`)."""
    from ..weights.safe_load import read_weight_file

    loaded = read_weight_file(path)
    return from_tensors(usable_weights(loaded.tensors, what=f"'{os.path.basename(path)}'"), loaded.metadata, source=os.path.basename(path))
