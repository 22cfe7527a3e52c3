"""Token lists as ComfyUI's CLIP tokenizers produce them: find words, put embedding vectors in.

A tokenized prompt (``CLIP.tokenize(text, return_word_ids=True)``) is, per text
encoder (``"l"``, ``"g"``, ``"h"``), a list of sections of ``(token, weight,
word_id)``, each section ``max_length`` (77) long: start token, the words'
BPE tokens, end token, padding. Every whitespace-separated word gets its own
``word_id > 0``; special tokens have word id 0. ComfyUI's text encoders accept
a 1-D tensor in place of an integer token (that is how textual-inversion
``embedding:`` files enter the prompt, ``comfy/sd1_clip.py`` in every
version), and put it in the input embedding sequence at that position.

This is how a learned identity token enters a prompt: the placeholder word is
replaced in the text by a marker word, the prompt is tokenized normally, and
the marker's tokens are swapped for the token vectors here. Pure Python/torch,
no ComfyUI import.
"""

from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import torch

Section = List[tuple]


def word_spans(section: Section) -> List[Tuple[int, int, int]]:
    """``(start, end, word_id)`` of each run of tokens sharing a word id > 0 (``end`` exclusive)."""
    spans = []
    start = None
    for i, token in enumerate(section):
        wid = token[2] if len(token) > 2 else 0
        if start is not None and wid != section[start][2]:
            spans.append((start, i, section[start][2]))
            start = None
        if start is None and wid > 0:
            start = i
    if start is not None:
        spans.append((start, len(section), section[start][2]))
    return spans


def _ids(section: Section, start: int, end: int) -> List[int]:
    return [int(t[0]) if not torch.is_tensor(t[0]) else -1 for t in section[start:end]]


def find_word(sections: Sequence[Section], word_ids: Sequence[int]) -> List[Tuple[int, int, int]]:
    """Every ``(section, start, end)`` where the tokens ``word_ids`` appear inside one word.

    A whitespace word may carry punctuation ("person," is the tokens of
    "person" then ","), so the tokens are searched for inside each word's span,
    every non-overlapping occurrence: ComfyUI 0.3.x gives all words of a
    weighted segment ONE word id (it splits words only at ``embedding:``), so a
    span there may hold the word several times.
    """
    target = [int(t) for t in word_ids]
    found = []
    if not target:
        return found
    for s, section in enumerate(sections):
        for start, end, _ in word_spans(section):
            ids = _ids(section, start, end)
            i = 0
            while i <= len(ids) - len(target):
                if ids[i : i + len(target)] == target:
                    found.append((s, start + i, start + i + len(target)))
                    i += len(target)
                else:
                    i += 1
    return found


def word_tokens(sections: Sequence[Section]) -> List[int]:
    """Token ids of a single word tokenized alone (its tokens with word id > 0)."""
    return [int(t[0]) for section in sections for t in section if len(t) > 2 and t[2] > 0]


def last_prompt_token(sections: Sequence[Section]) -> int:
    """Index, in the concatenated context, of the last word token (the token before the end token).

    Raises ``ValueError`` for an empty prompt.
    """
    last = None
    for s, section in enumerate(sections):
        for i, token in enumerate(section):
            if len(token) > 2 and token[2] > 0:
                last = s * len(section) + i
    if last is None:
        raise ValueError("the prompt has no words")
    return last


def replace_word(sections: Sequence[Section], word_ids: Sequence[int], vectors: torch.Tensor) -> List[Section]:
    """Replace every occurrence of the word ``word_ids`` by the rows of ``vectors`` ``[n, width]``.

    The inserted vectors keep the weight of the word's first token (so
    ``(placeholder:1.2)`` works). Each section keeps its length: a shorter
    result is padded with the section's last token (end/padding), a longer one
    gives up padding at the end. Returns sections of ``(token, weight)``.
    Raises ``ValueError`` when the word is absent or a section would overflow.
    """
    hits = find_word(sections, word_ids)
    if not hits:
        raise ValueError("the placeholder word is not in the prompt")
    by_section = {}
    for s, start, end in hits:
        by_section.setdefault(s, []).append((start, end))
    rows = [vectors[i] for i in range(vectors.shape[0])]
    out = []
    for s, section in enumerate(sections):
        spans = sorted(by_section.get(s, []))
        new: Section = []
        cursor = 0
        for start, end in spans:
            new.extend((t[0], t[1]) for t in section[cursor:start])
            weight = section[start][1]
            new.extend((row, weight) for row in rows)
            cursor = end
        new.extend((t[0], t[1]) for t in section[cursor:])
        out.append(_fit(new, len(section)))
    return out


def _fit(section: Section, length: int) -> Section:
    if len(section) == length:
        return section
    last = section[-1]
    if len(section) < length:
        return section + [(last[0], 1.0)] * (length - len(section))
    surplus = len(section) - length
    run = 0
    for token in reversed(section):
        if torch.is_tensor(token[0]) or torch.is_tensor(last[0]) or int(token[0]) != int(last[0]):
            break
        run += 1
    if run <= surplus:
        raise ValueError("the prompt is too long to take the identity token vectors")
    return section[:length]


def strip_word_ids(tokens: dict) -> dict:
    """``{encoder: sections of (token, weight, word_id)}`` -> the same with ``(token, weight)``."""
    return {key: [[(t[0], t[1]) for t in section] for section in sections] for key, sections in tokens.items()}


def flatten_count(sections: Iterable[Section]) -> int:
    return sum(len(section) for section in sections)
