"""The order artists meet the example workflows in, simplest first, and the one to open first.

Used by the README ("Start here" and the workflow gallery, scripts/readme_tables.py)
and by the template-browser thumbnails (scripts/workflow_thumbnails.py), which carry
each workflow's place in this order: ComfyUI's template browser lists a pack's
templates in the server's directory order under their file names, so the
thumbnail is where the order and the one-line description can be seen.

A new example workflow gets a place here (tests/test_template_browser.py fails
until it has one).
"""

from __future__ import annotations

from typing import Iterable, List

START_HERE = "identity_portrait_faceid_moa"

# simplest first: a portrait from one photo, then what each part does, then one mechanism per workflow,
# then editing, then training, then Flux
ORDER = [
    START_HERE,
    "identity_encode_and_similarity",
    "identity_adapter_load",
    "identity_from_many_photos",
    "identity_portrait_sdxl",
    "instantid_identitynet_sdxl",
    "identity_portrait_pulid",
    "two_people_with_masks",
    "nested_attention",
    "kv_mixed_attention",
    "face_adapter_fact",
    "per_stage_identity_tokens",
    "face_edit_stfg",
    "face_edit_ca2_gate",
    "face_edit_ca2_stfg",
    "personalize_then_generate",
    "restore_old_photo_of_person",
    "flux_portrait_pulid",  # last: ComfyUI 0.3+ only, and about 35 GB of Flux files
    "flux_image_prompt_xlabs",
    "flux_image_prompt_instantx",
]

# What the first image should look like, in words (the screenshots are taken on random-weight test models).
START_HERE_RESULT = (
    "a 512x512 photo of the person in your reference photo as an astronaut in a hangar, the face recognisably "
    "theirs while suit, helmet and light follow the prompt. Beside it, *Identity similarity* writes a score on "
    "the image (1 = the same face embedding, unrelated people score near 0) and the router maps show the face "
    "area in white: that is where the identity went. A face that is not theirs: raise the attention's "
    "`weight`, use a clearer frontal reference photo, or add more photos of the person."
)


def ordered(names: Iterable[str]) -> List[str]:
    """``names`` in :data:`ORDER`; names without a place come last, alphabetically."""
    names = list(names)
    placed = [n for n in ORDER if n in names]
    return placed + sorted(n for n in names if n not in ORDER)


def rank(name: str) -> int:
    """1 for the first workflow to open; 0 for a workflow without a place."""
    return ORDER.index(name) + 1 if name in ORDER else 0
