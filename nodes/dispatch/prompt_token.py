"""A learned prompt token (PVA's ``<new1>`` / ``modifier_vec``) inside ComfyUI's text encoders.

PVA prompts "photo of a <new1> person", where ``<new1>`` is a token added to the tokenizer whose
input embedding is the learned ``modifier_vec`` (``TunedEmbedding``, single-token mode; the text
encoder itself stays frozen). That is exactly a one-vector textual-inversion embedding, and
ComfyUI's text encoders accept those, but the old hosts build them in a way autograd cannot
pass through. So, here:

1. The artist's placeholder (default ``<new1>``) is replaced in the text by a *marker*: a word
   the CLIP vocabulary has as one token and the prompt does not otherwise contain ("sks",
   "ohwx", ...). The text is then tokenized by the CLIP's own tokenizer (weights, long prompts,
   SDXL's two encoders behave as in CLIPTextEncode).
2. A probe finds, for each text encoder, the token-embedding table and the id under which it
   sees the marker: the template is encoded with the marker and with a control word, and the
   table inputs that differ are the marker's (this works for any encoder whose ids reach an
   ``nn.Embedding``, including ones that remap ids).
3. A CLIP *clone* gets, as ComfyUI object patches, a :class:`PlaceholderEmbedding` in place of
   each table: it returns the table's rows, except the marker's rows, which are the learned
   vector of that encoder (same value the textual-inversion path would put there). Because the
   replacement is ``torch.where`` on the table output, gradients reach the vector, and the
   upstream CLIP is never changed (object patches are removed when the clone is unloaded).

Vectors are keyed by encoder: ``"l"`` (CLIP-L, 768), ``"g"`` (OpenCLIP bigG, 1280), ``"h"``
(OpenCLIP-H, 1024), else ``"d<width>"``. A textual-inversion file made from them
(:func:`embedding_file_tensors`, ``clip_l`` / ``clip_g`` keys, ComfyUI's format) lets any
CLIPTextEncode use the trained token as ``embedding:<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..common.errors import IdentityAttentionError

PLACEHOLDER = "<new1>"
DEFAULT_TEMPLATE = "photo of a <new1> person"
MARKERS = ("sks", "ohwx", "zwx", "xqz", "qzx", "vxb")
CONTROL_WORDS = ("dog", "house", "tree", "car")
ENCODER_BY_WIDTH = {768: "l", 1280: "g", 1024: "h"}
EMBEDDING_FILE_KEYS = {"l": "clip_l", "g": "clip_g", "h": "clip_h"}


def encoder_name(width: int, taken: List[str]) -> str:
    name = ENCODER_BY_WIDTH.get(int(width), f"d{int(width)}")
    while name in taken:
        name += "_"
    return name


class PlaceholderEmbedding(torch.nn.Module):
    """Stands in for a token-embedding table on a CLIP clone (an object patch).

    Shares the table's parameters (same names, same tensors); ``forward(ids)`` is the table's
    output with the rows where ``ids == token_id`` replaced by ``vector()`` (when not None).
    """

    def __init__(self, table: torch.nn.Module, token_id: int, vector: Callable[[], Optional[torch.Tensor]]):
        super().__init__()
        self._modules = table._modules
        self._parameters = table._parameters
        self._buffers = table._buffers
        self.__dict__["table"] = table
        self.__dict__["vector"] = vector
        self.token_id = int(token_id)
        for name in ("num_embeddings", "embedding_dim", "padding_idx"):
            if hasattr(table, name):
                self.__dict__[name] = getattr(table, name)

    def forward(self, ids, *args, **kwargs):
        out = self.table(ids, *args, **kwargs)
        vec = self.vector()
        if vec is None:
            return out
        hit = (ids == self.token_id).unsqueeze(-1)
        return torch.where(hit, vec.to(device=out.device, dtype=out.dtype), out)


@dataclass(frozen=True)
class TokenTable:
    """Where one text encoder reads the marker: the table's object-patch path and the id it sees."""

    path: str
    token_id: int
    width: int
    encoder: str


@dataclass(frozen=True)
class PromptToken:
    """The marker chosen for a prompt and the tables that see it."""

    marker: str
    tables: Tuple[TokenTable, ...]

    @property
    def encoders(self) -> Dict[str, int]:
        return {t.encoder: t.width for t in self.tables}


def _tables(clip) -> Dict[str, torch.nn.Module]:
    root = clip.patcher.model
    return {name: m for name, m in root.named_modules() if isinstance(m, (torch.nn.Embedding, PlaceholderEmbedding)) and name}


def _record_ids(clip, text: str, tables: Dict[str, torch.nn.Module]) -> Dict[str, List[torch.Tensor]]:
    seen: Dict[str, List[torch.Tensor]] = {name: [] for name in tables}
    handles = []

    def hook(name):
        def pre(module, args):
            if args and torch.is_tensor(args[0]) and not args[0].is_floating_point():
                seen[name].append(args[0].detach().cpu().reshape(-1).clone())

        return pre

    try:
        for name, module in tables.items():
            handles.append(module.register_forward_pre_hook(hook(name)))
        with torch.no_grad():
            clip.encode_from_tokens(clip.tokenize(text))
    finally:
        for h in handles:
            h.remove()
    return seen


def _marker_ids(with_marker: List[torch.Tensor], with_control: List[torch.Tensor]) -> Optional[int]:
    """The one id a table sees where the marker prompt differs from the control prompt."""
    if not with_marker or len(with_marker) != len(with_control):
        return None
    a, b = torch.cat(with_marker), torch.cat(with_control)
    if a.shape != b.shape:
        return None
    diff = a != b
    if not bool(diff.any()):
        return None
    ids = torch.unique(a[diff])
    if ids.numel() != 1:
        return None
    token = int(ids[0])
    if bool((a[~diff] == token).any()):  # the marker's id also stands for another token of this prompt
        return None
    return token


def find_prompt_token(clip, text: str, placeholder: str = PLACEHOLDER, node: str = "") -> PromptToken:
    """Choose a marker for ``text`` and find the token tables that see it (no weights change)."""
    if placeholder not in text:
        raise IdentityAttentionError(
            f"the prompt has no '{placeholder}' to put the learned token in",
            node=node,
            input_name="prompt",
            fix=f"write '{placeholder}' where the person's name would go, e.g. '{DEFAULT_TEMPLATE}'",
        )
    lowered = text.lower()
    tables = _tables(clip)
    for marker in MARKERS:
        if marker in lowered:
            continue
        for control in CONTROL_WORDS:
            if control in lowered:
                continue
            a = _record_ids(clip, with_marker(text, placeholder, marker), tables)
            b = _record_ids(clip, with_marker(text, placeholder, control), tables)
            found: List[TokenTable] = []
            for name, module in tables.items():
                token = _marker_ids(a[name], b[name])
                if token is not None:
                    width = int(getattr(module, "embedding_dim", 0) or module.weight.shape[1])
                    found.append(TokenTable(name, token, width, encoder_name(width, [t.encoder for t in found])))
            if found:
                return PromptToken(marker, tuple(found))
    raise IdentityAttentionError(
        "could not find where this text encoder reads its tokens, so a learned token cannot be placed",
        node=node,
        input_name="clip",
        fix="use the CLIP of an SD1.5, SD2 or SDXL checkpoint",
    )


def with_marker(text: str, placeholder: str, marker: str) -> str:
    """The placeholder replaced by the marker as a word of its own."""
    return text.replace(placeholder, f" {marker} ")


def token_clip(clip, token: PromptToken, vectors: Callable[[str], Optional[torch.Tensor]]):
    """A CLIP clone whose token tables put ``vectors(encoder)`` at the marker (object patches)."""
    clone = clip.clone()
    root = clip.patcher.model
    for table in token.tables:
        module = _get(root, table.path)
        if isinstance(module, PlaceholderEmbedding):
            module = module.table
        clone.patcher.add_object_patch(table.path, PlaceholderEmbedding(module, table.token_id, lambda e=table.encoder: vectors(e)))
    return clone


def _get(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def encode_tokens(clip, tokens) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(cond [1, L, D], pooled)`` without loading models: the caller has loaded ``clip`` (keeps gradients)."""
    model = clip.cond_stage_model
    model.reset_clip_options()
    if getattr(clip, "layer_idx", None) is not None:
        model.set_clip_options({"layer": clip.layer_idx})
    out = model.encode_token_weights(tokens)
    return out[0], out[1]


def initial_vectors(token: PromptToken, stored: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Starting vectors per encoder: ``stored`` ones when their width fits, else zeros (PVA: ``0 + modifier_vec``)."""
    out = {}
    for table in token.tables:
        vec = (stored or {}).get(table.encoder)
        if vec is not None and vec.numel() == table.width:
            out[table.encoder] = vec.detach().float().reshape(-1).clone()
        else:
            out[table.encoder] = torch.zeros(table.width)
    return out


def embedding_file_tensors(vectors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A textual-inversion file for ComfyUI's ``embedding:<name>`` syntax (``{"clip_l": [1, 768], ...}``)."""
    out = {}
    for encoder, vec in vectors.items():
        out[EMBEDDING_FILE_KEYS.get(encoder, encoder)] = vec.detach().float().reshape(1, -1).contiguous().cpu()
    return out


def encode_prompt(clip, text: str, vectors: Dict[str, torch.Tensor], placeholder: str = PLACEHOLDER, node: str = ""):
    """CONDITIONING for ``text`` with the placeholder carrying ``vectors`` (inference, no gradients)."""
    from .differentiable_unet import release

    token = find_prompt_token(clip, text, placeholder, node)
    missing = [t.encoder for t in token.tables if t.encoder not in vectors]
    if missing:
        raise IdentityAttentionError(
            f"the learned token has no vector for text encoder(s) {', '.join(missing)} of this CLIP",
            node=node,
            input_name="id_adapter",
            fix="use the CLIP of the model the identity was personalized on",
        )
    clone = token_clip(clip, token, lambda e: vectors.get(e))
    try:
        tokens = clone.tokenize(with_marker(text, placeholder, token.marker))
        cond, pooled = clone.encode_from_tokens(tokens, return_pooled=True)
    finally:
        release(clone.patcher)
    return [[cond, {"pooled_output": pooled}]]
