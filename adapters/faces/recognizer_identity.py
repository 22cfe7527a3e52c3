"""Which face recognizer made an IDENTITY's embeddings, and whether an adapter was trained on it.

IP-Adapter-FaceID, FaceID-Plus and PlusV2 were trained on embeddings of insightface's
``buffalo_l`` pack (recognizer ``w600k_r50.onnx``, an IResNet-50 trained on WebFace600K);
InstantID and PuLID on ``antelopev2`` (``glintr100.onnx``, an IResNet-100 trained on
Glint360K). Both give 512 values per face, but they are different embedding spaces: the
same face gives unrelated vectors, so an adapter fed the other pack's embedding draws a
different person, with no error anywhere. This module makes that visible.

:func:`identify_recognizer` names the embedding space of a recognizer file (:class:`RecognizerId`):

1. its sha256 equals the published file's (``weights_manifest.json``: ``buffalo_l-w600k_r50``,
   ``antelopev2-glintr100``); the file is hashed only when its size equals a published size;
2. else its file name is the published name AND its network has the published architecture's
   signature (an ONNX graph with 3 x 112 x 112 input, 512 outputs and the number of
   convolutions of an IResNet of that depth: 1 stem + 2 per residual block + 1 per stage
   downsample = 53 for IResNet-50 ([3, 4, 14, 3] blocks), 103 for IResNet-100 ([3, 13, 30, 3])):
   a converted or re-exported copy of the published file;
3. else unknown (``space`` None): a recognizer this pack cannot identify. That is a warning
   (the Load face analysis node's info says it), never an error: the artist may know better.

:func:`expected_space` is the space an adapter needs (the manifest entry's ``requires`` when
the file is listed there, else its format), :func:`pairing_verdict` compares the two under the
``recognizer_check`` policy: ``error`` (default: a mismatch stops the run with the fix),
``warn`` (a mismatch is logged, the run goes on) or ``off``. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

from ..weights.weights_manifest import manifest_or_none

RECOGNIZER_CHECKS = ("error", "warn", "off")


@dataclass(frozen=True)
class KnownRecognizer:
    """A published recognizer: the pack (= embedding space) it belongs to and how to recognise it."""

    space: str  # the insightface pack whose embeddings adapters were trained on
    file: str
    manifest_id: str
    network: str
    convolutions: int


KNOWN_RECOGNIZERS: Tuple[KnownRecognizer, ...] = (
    KnownRecognizer("buffalo_l", "w600k_r50.onnx", "buffalo_l-w600k_r50", "IResNet-50 (WebFace600K)", 53),
    KnownRecognizer("antelopev2", "glintr100.onnx", "antelopev2-glintr100", "IResNet-100 (Glint360K)", 103),
)
SPACES = {k.space: k for k in KNOWN_RECOGNIZERS}

# the embedding space each adapter format was trained on (used when the file is not in the manifest)
FORMAT_SPACES = {"faceid": "buffalo_l", "faceid_plus": "buffalo_l", "instantid": "antelopev2", "pulid": "antelopev2"}
FORMAT_WORDS = {"faceid": "IP-Adapter-FaceID", "faceid_plus": "IP-Adapter-FaceID-Plus", "instantid": "InstantID", "pulid": "PuLID"}


@dataclass(frozen=True)
class RecognizerId:
    """What made an IDENTITY's embeddings.

    ``pack``: the pack folder the artist picked; ``file``: the recognizer file; ``sha256``: its
    digest when it was computed (only for files of a published size); ``network``: the ONNX
    graph's signature; ``space``: ``buffalo_l`` / ``antelopev2`` when identified, else None;
    ``evidence``: how (or why not), in an artist's words.
    """

    pack: str
    file: str
    sha256: Optional[str]
    network: str
    space: Optional[str]
    evidence: str

    @property
    def label(self) -> str:
        return f"{self.pack}/{self.file}"

    def describe(self) -> str:
        if self.space is None:
            return f"recognizer {self.label}: not identified ({self.evidence})"
        return f"recognizer {self.label}: {self.space}'s {SPACES[self.space].file} ({self.evidence})"


def graph_signature(path: os.PathLike) -> Tuple[str, Optional[int], Optional[int], Optional[int]]:
    """``(text, convolutions, input side, output width)`` of an ONNX recognizer (Nones where unreadable)."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - only a description
        return f"not readable as ONNX ({type(err).__name__})", None, None, None
    graph = model.graph
    convs = sum(1 for n in graph.node if n.op_type == "Conv")
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]

    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]

    side = width = None
    if inputs:
        d = dims(inputs[0])
        side = d[2] if len(d) == 4 and d[2] == d[3] else None
    if graph.output:
        d = dims(graph.output[0])
        width = d[-1] if d else None
    text = f"{convs} convolutions, input {side or '?'}x{side or '?'}, {width or '?'} outputs"
    return text, convs, side, width


_CACHE: Dict[tuple, RecognizerId] = {}


def identify_recognizer(path: os.PathLike, pack: str, manifest=None) -> RecognizerId:
    """Identify the recognizer file ``path`` of pack ``pack`` (see the module docstring); cached per file version."""
    from ..weights.file_hash import sha256_file

    path = Path(path)
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, pack, id(manifest) if manifest is not None else None)
    if key in _CACHE:
        return _CACHE[key]
    manifest = manifest_or_none(manifest)
    published = {}
    if manifest is not None:
        for known in KNOWN_RECOGNIZERS:
            entry = manifest.by_id.get(known.manifest_id)
            if entry and entry.get("sha256") and entry.get("bytes"):
                published[known.space] = entry
    digest = None
    space = evidence = None
    if any(e["bytes"] == st.st_size for e in published.values()):
        digest = sha256_file(str(path))
        for s, entry in published.items():
            if entry["sha256"] == digest:
                space, evidence = s, f"sha256 equals the published {entry['id']}"
    network, convs, side, width = graph_signature(path)
    if space is None:
        for known in KNOWN_RECOGNIZERS:
            if path.name.lower() == known.file and convs == known.convolutions and side == 112 and width == 512:
                space = known.space
                evidence = (f"its name and network ({known.network}: {convs} convolutions, 112x112 -> 512) are {known.space}'s; "
                            "not the published bytes (a converted copy?)")
        if space is None:
            names = " or ".join(f"{k.file} ({k.space})" for k in KNOWN_RECOGNIZERS)
            evidence = f"neither the published file nor the network of {names}; its network: {network}"
    found = RecognizerId(pack=pack, file=path.name, sha256=digest, network=network, space=space, evidence=evidence)
    _CACHE[key] = found
    return found


def expected_space(adapter_format: str, source_format: Optional[str] = None, requires: Iterable[str] = ()) -> Optional[str]:
    """The embedding space an adapter was trained on: a space named in its manifest ``requires``, else by format."""
    for name in requires or ():
        if name in SPACES:
            return name
    fmt = source_format if adapter_format == "native" and source_format else adapter_format
    return FORMAT_SPACES.get(fmt)


@dataclass(frozen=True)
class PairingVerdict:
    """``status``: ok, mismatch, unknown (recognizer not identified), not_checked (adapter needs no
    particular recognizer, or check off); ``message``; ``fix`` (for mismatches)."""

    status: str
    message: str = ""
    fix: str = ""


def pairing_verdict(expected: Optional[str], recognizer: Optional[RecognizerId], adapter_words: str,
                    recognizer_label: str = "unknown", policy: str = "error") -> PairingVerdict:
    """Compare the space an adapter needs with the recognizer that made the identity."""
    if policy not in RECOGNIZER_CHECKS:
        raise ValueError(f"recognizer_check must be one of {', '.join(RECOGNIZER_CHECKS)}, not {policy!r}")
    if expected is None or policy == "off":
        return PairingVerdict("not_checked")
    need = SPACES[expected]
    if recognizer is None or recognizer.space is None:
        why = recognizer.evidence if recognizer is not None else f"the identity does not record which recognizer made it ({recognizer_label})"
        return PairingVerdict(
            "unknown",
            f"the {adapter_words} adapter was trained on {expected} embeddings ({need.file}), and the identity's recognizer "
            f"{recognizer.label if recognizer is not None else recognizer_label} could not be identified ({why}); "
            "if it is not that recognizer, the likeness will be wrong",
        )
    if recognizer.space == expected:
        return PairingVerdict("ok", f"the identity comes from {expected}'s {need.file}, as the {adapter_words} adapter expects")
    return PairingVerdict(
        "mismatch",
        f"the identity was made with {recognizer.label} ({recognizer.space}'s recognizer: {recognizer.evidence}), but the "
        f"{adapter_words} adapter was trained on {expected} embeddings ({need.file}); the two 512-value embeddings are "
        "different spaces, so the adapter would draw someone else",
        f"load {expected} for {adapter_words} files: choose pack {expected} in 'Load face analysis model' (files in "
        f"models/insightface/models/{expected}/) and encode the identity with it; or set recognizer_check to warn or off on "
        "'Load identity adapter' if you know this recognizer gives the same embeddings",
    )
