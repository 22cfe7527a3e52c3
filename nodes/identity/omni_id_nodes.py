"""Node: Pool reference photos (attention) — the training-free way to make one identity of many photos.

Wraps an ID_ADAPTER so that its projector reads every reference photo and pools the per-photo
tokens by attention (``adapters/projectors/set_encoder.py``: ``AttentionPooledProjector``) instead of
averaging the photos' features. The result is an ID_ADAPTER like any other: every attention
node takes it, with the adapter's own projections. An adapter trained by the ``omni_id``
target already has a set encoder and needs no pooling.
"""

from __future__ import annotations

from dataclasses import replace

from ...adapters.projectors.set_encoder import AttentionPooledProjector
from ..common.errors import IdentityAttentionError
from ..common.input_checks import check_cross_attention_adapter
from ..dispatch.stage_inputs import CATEGORY


class PoolReferencePhotos:
    NODE_ID = "IdentityAttentionPoolReferencePhotos"
    DISPLAY_NAME = "Pool reference photos (attention)"
    CATEGORY = f"{CATEGORY}/encode"
    DESCRIPTION = (
        "Makes an adapter read all reference photos of the identity as one set: each photo's tokens are made separately and "
        "combined by attention (photos that agree with the others count more) into the adapter's usual number of tokens. "
        "Training-free (Omni-ID style without its trained encoder); an adapter trained with the omni_id target does this itself."
    )
    PAPER = "Omni-ID: Qian et al., *Omni-ID: Holistic Identity Representation Designed for Generative Tasks*, CVPR 2025 ([arXiv 2412.09694](https://arxiv.org/abs/2412.09694))"
    RETURN_TYPES = ("ID_ADAPTER",)
    RETURN_NAMES = ("id_adapter",)
    OUTPUT_TOOLTIPS = ("The same adapter, its tokens pooled over all reference photos: connect it to any attention node.",)
    FUNCTION = "pool"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"id_adapter": ("ID_ADAPTER", {"tooltip": "Any identity adapter with a token projector (IP-Adapter, FaceID, InstantID, PuLID, PVA...)."})}}

    def pool(self, id_adapter):
        node = self.DISPLAY_NAME
        check_cross_attention_adapter(id_adapter, node, "id_adapter")
        if id_adapter.projector is None:
            raise IdentityAttentionError("this adapter has no token projector, so there are no tokens to pool", node=node, input_name="id_adapter", fix="load the adapter file that includes its image projection model")
        if getattr(id_adapter.projector, "reads_set", False):
            raise IdentityAttentionError(
                "this adapter already reads all reference photos as one set (a trained set encoder, or pooled already)",
                node=node, input_name="id_adapter", fix="connect the adapter straight to the attention node",
            )
        return (replace(id_adapter, projector=AttentionPooledProjector(id_adapter.projector), metadata=dict(id_adapter.metadata, pooled="attention over reference photos")),)


NODES = [PoolReferencePhotos]
