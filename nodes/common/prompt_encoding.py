"""Encoding prompts whose placeholder word carries learned token vectors, with the host's CLIP.

The placeholder (e.g. ``V*``) is replaced in the text by a marker word that the
prompt does not contain, the text is tokenized by the CLIP's own tokenizer
(weights syntax, long prompts and SDXL's two encoders all behave as in
CLIPTextEncode), and the marker's tokens are swapped for the token vectors
(see ``adapters/attention/prompt_tokens.py``). ComfyUI's text encoders take a tensor in
place of a token id in every version (the textual-inversion path), so the
vectors go through the real CLIP transformer like any word.
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

import torch

from ...adapters.attention import prompt_tokens

# words the CLIP vocabulary has as a single token and prompts rarely contain; any unused one works
MARKER_CANDIDATES = ("sks", "ohwx", "zwx", "xqz", "qzx", "placeholderidentity")


def tokenize(clip, text: str) -> dict:
    """``{encoder: sections of (token, weight, word_id)}``."""
    return clip.tokenize(text, return_word_ids=True)


def _word_ids(clip, word: str) -> Dict[str, list]:
    return {key: prompt_tokens.word_tokens(sections) for key, sections in tokenize(clip, word).items()}


def choose_marker(clip, text: str) -> Tuple[str, Dict[str, list]]:
    """A marker word absent from ``text``, preferring one a single token long, and its token ids."""
    lowered = text.lower()
    fallback = None
    for word in MARKER_CANDIDATES:
        if word in lowered:
            continue
        ids = _word_ids(clip, word)
        if all(len(v) == 1 for v in ids.values()):
            return word, ids
        if fallback is None and all(ids.values()):
            fallback = (word, ids)
    if fallback is None:
        raise ValueError("no marker word is free in this prompt")
    return fallback


def _placeholder_pattern(placeholder: str):
    # the placeholder as a whole word: "V*" matches in "V*," or "(V*:1.2)" but "V" does not match inside "Very"
    return re.compile(r"(?<!\w)" + re.escape(placeholder) + r"(?!\w)")


def has_placeholder(text: str, placeholder: str) -> bool:
    return bool(placeholder) and _placeholder_pattern(placeholder).search(text) is not None


def with_marker(text: str, placeholder: str, marker: str) -> str:
    """The placeholder replaced by ``marker`` as a word of its own (spaces around it; empty marker removes it)."""
    return _placeholder_pattern(placeholder).sub(lambda _: f" {marker} " if marker else " ", text)


def encode(clip, tokens: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """``clip.encode_from_tokens`` -> (cond ``[1, L, D]``, pooled)."""
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


def encode_with_vectors(clip, marked_tokens: dict, marker_ids: Dict[str, list], vectors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The marked prompt with the marker swapped for ``vectors[encoder]`` ``[n, width]``: ``[1, L, D]``."""
    tokens = {}
    for key, sections in marked_tokens.items():
        if key not in vectors:
            raise KeyError(key)
        tokens[key] = prompt_tokens.replace_word(sections, marker_ids[key], vectors[key].detach().float().cpu())
    cond, _ = encode(clip, tokens)
    return cond


class NoTokenTable(ValueError):
    """The CLIP gives no access to its token-embedding table (a word's vector cannot be read)."""


def embedding_table(clip, encoder: str):
    """The input token-embedding matrix ``[vocab, width]`` of one of the CLIP's text encoders, or None."""
    model = getattr(clip.cond_stage_model, f"clip_{encoder}", None)
    transformer = getattr(model, "transformer", None)
    getter = getattr(transformer, "get_input_embeddings", None)
    if getter is None:
        return None
    return getter().weight


def word_embedding(clip, word: str) -> Dict[str, torch.Tensor]:
    """``{encoder: [width]}``: the word's token embedding (the mean over its tokens if it has several).

    Raises ``ValueError`` when the word is empty, :class:`NoTokenTable` when the CLIP does not
    expose its embeddings.
    """
    out = {}
    for key, ids in _word_ids(clip, word).items():
        if not ids:
            raise ValueError(f"'{word}' has no tokens")
        table = embedding_table(clip, key)
        if table is None:
            raise NoTokenTable(f"this CLIP's text encoder '{key}' does not expose its token embeddings")
        out[key] = table.detach()[torch.tensor(ids, device=table.device)].float().mean(dim=0).cpu()
    return out


def subject_token(clip, text: str, word: str = "") -> Tuple[int, int, str]:
    """Where the subject sits in the prompt's context: ``(index, prompt_length, listing)``.

    word empty: the last prompt token (the last word token before the end
    token); otherwise the *last* token of the first occurrence of ``word``
    (CLIP's causal attention makes a word's last token the one that has seen
    all of it). prompt_length: the context length of this prompt (77 per
    section). Raises ``ValueError`` when the word is not in the prompt.
    """
    tokens = tokenize(clip, text)
    key = sorted(tokens)[0]
    sections = tokens[key]
    length = prompt_tokens.flatten_count(sections)
    if word.strip():
        ids = _word_ids(clip, word.strip())[key]
        hits = prompt_tokens.find_word(sections, ids)
        if not hits:
            raise ValueError(f"'{word.strip()}' is not a word of the prompt")
        s, _, end = hits[0]
        index = s * len(sections[0]) + end - 1
    else:
        index = prompt_tokens.last_prompt_token(sections)
    listing = _listing(clip, sections, index)
    return index, length, listing


def _listing(clip, sections, index: int) -> str:
    inverse = getattr(getattr(clip.tokenizer, f"clip_{sorted(clip.tokenize(''))[0]}", None), "inv_vocab", None) or {}
    parts = []
    for s, section in enumerate(sections):
        for i, token in enumerate(section):
            if len(token) > 2 and token[2] > 0:
                pos = s * len(section) + i
                name = inverse.get(int(token[0]), str(int(token[0]))) if not torch.is_tensor(token[0]) else "<vector>"
                parts.append(f"{'>' if pos == index else ''}{pos}:{name}")
    return " ".join(parts)
