"""*Apply mixture-of-attention* (+ *Show router maps*) on a Flux MODEL: route each image token.

MoA (adapters/attention/attention_routing.py) mixes, per query, the model's own attention (the prior)
with the personalized attention of the identity stages applied before it::

    routed = R0 * prior + R1 * personalized,    result = lerp(out, routed, weight)

In a Flux joint block (nodes/common/dit_layout.py), per image query:

- ``prior``: the block's joint attention output over ``[txt; img]`` as the host computed it,
  before any of the pack's stages (the dispatcher keeps it: ``DitCall.host_out``; with another
  pack's attention override, that override's output, as on UNets where a foreign replace
  computes the prior);
- ``personalized``: ``out``, what the stages before this one made of it;
- text queries keep ``out`` (no stage of the pack changes them; MoA routes pixels).

Routers on Flux:

- ``identity_attention`` (training-free): for every joint identity stage before this one
  (joint identity attention, KV-mixed), the heads-averaged mass of the image query's joint softmax
  over ``[txt; img; id]`` on the identity columns (joint stages with their ``log w``, decoupled
  KV-mixed without, as on UNets), times that stage's mask, zero on rows and steps it does not act
  in; summed, clipped to [0, 1], then :func:`route_from_identity_share` (the UNet router's
  normalisation and temperature);
- ``mask``: ``R1`` = the mask at each image token's 2x2 patch;
- the optional mask limits the other routers (``R1 <- R1 * mask``, ``R0 = 1 - R1``);
  reference-latent tokens (Kontext) get mask 0, so they keep the prior.

Refused on Flux, with the reason: the ``learned`` router (its MLPs are trained per UNet
cross-attention layer on that layer's hidden states) and ``prior: base`` (the base-weights prior
re-projects the layer's inputs with the loaded q/k/v weights; the DiT hook sees q/k/v after the
block's projections, norms and RoPE, not the block's inputs), so on Flux the prior is
``current``: the attention as the model arrives here, LoRAs included.

R1 maps of every block are recorded (cond and uncond) for *Show router maps*: Flux has one
token grid, so one map per image; the step's sigma is read once per model call.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...adapters.attention.attention_routing import RouterRecorder, mixture_of_attention, route_from_identity_share, route_from_mask
from ...adapters.attention.text_attention_mass import mass_from_heads
from ..dispatch.dispatcher import StageSchedule
from ..dispatch.dit_dispatcher import DitCall, DitStage, apply_dit_stage, installed_dit_dispatcher
from ..pva.dit_joint_identity import DitJointIdentityStage
from ..kv_mixed.dit_kv_mixed import JOINT, DitKVMixedStage
from ..common.dit_layout import FAMILY_NAMES, dit_family, identity_key_value
from ..common.errors import IdentityAttentionError

DIT_ROUTERS = ("identity_attention", "mask")


def column_share(q_img: torch.Tensor, keys: torch.Tensor, first: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, N]`` float32: heads-averaged softmax mass of each query on the key columns from ``first`` on.

    q_img ``[B, H, N, D]``, keys ``[B, H, L, D]``, bias ``[1, 1, 1, L]`` or None. One fused SDPA
    whose values are the column indicator (repeated to the head width: fused kernels need one).
    """
    b, h, _, d = q_img.shape
    columns = keys.shape[2]
    indicator = (torch.arange(columns, device=keys.device) >= first).to(q_img.dtype)
    values = indicator.reshape(1, 1, columns, 1).expand(b, h, columns, d)
    return mass_from_heads(F.scaled_dot_product_attention(q_img, keys, values, attn_mask=bias)[..., 0])


def identity_share(stage: DitStage, call: DitCall, cache: dict) -> Optional[torch.Tensor]:
    """``[B, N, 1]``: ``stage``'s identity share of the image queries (None where it does not act)."""
    s = stage.schedule
    if not stage.is_active(call):
        return None
    window = s.window(call.options.get("sigmas"))
    keep = [s.applies_to_chunk(code) for code in call.chunks]
    if window is False or not any(keep):
        return None
    if isinstance(stage, DitKVMixedStage):
        k_id, _ = stage.key_value(call)
        joint = stage.mode == JOINT
    else:
        key = (id(stage), tuple(call.chunks), call.batch, call.q.device, call.vec.dtype)
        hidden = cache.get(key)
        if hidden is None:
            rows = {c: stage.hidden(stage.tokens.cond if c == 0 else stage.tokens.uncond).to(device=call.q.device, dtype=call.vec.dtype) for c in set(call.chunks)}
            hidden = cache[key] = call.per_row(rows)
        k_id, _ = identity_key_value(call.block, hidden, call.vec, call.heads)
        joint = True
    m, columns = call.text_tokens, call.k.shape[2]
    keys = torch.cat([call.k, k_id.to(call.k.dtype)], dim=2)
    bias = None
    if joint and s.weight != 1.0:
        bias = torch.zeros(1, 1, 1, keys.shape[2], device=call.q.device, dtype=call.q.dtype)
        bias[..., columns:] = math.log(s.weight)  # weight > 0 here: a joint stage at weight 0 is inactive
    share = column_share(call.q[:, :, m:], keys, columns, bias).unsqueeze(-1).to(call.q.dtype)
    region = stage.region(call)
    if region is not None:
        share = share * region
    if not all(keep):
        share = share * call.row_mask(keep, cache).to(share.dtype)
    if window is not True:
        share = share * window.to(share.dtype).reshape(1, 1, 1)
    return share


class DitMixtureOfAttentionStage(DitStage):
    """Routes every image token between the host's joint attention (prior) and the stages before it.

    router: one of :data:`DIT_ROUTERS`; router_mask ``[Bm, H, W]`` (required by "mask");
    identity_stages: the joint identity / KV-mixed stages before this one.
    """

    def __init__(self, schedule: StageSchedule, router: str, temperature: float = 1.0, router_mask: Optional[torch.Tensor] = None,
                 identity_stages: Sequence[DitStage] = (), recorder: Optional[RouterRecorder] = None, label: str = "Apply mixture-of-attention (Flux)"):
        super().__init__(schedule)
        if router not in DIT_ROUTERS:
            raise ValueError(f"unknown router {router!r} on the DiT path; known: {', '.join(DIT_ROUTERS)}")
        if router == "mask" and router_mask is None:
            raise ValueError("the mask router needs a mask")
        if not temperature > 0:
            raise ValueError("temperature must be > 0")
        self.router = router
        self.temperature = float(temperature)
        self.router_mask = router_mask
        self.identity_stages = tuple(identity_stages)
        self.recorder = recorder
        self.label = label
        self._share_cache: dict = {}
        self._mask_cache: dict = {}
        self._sigma = (None, None)

    def route(self, call: DitCall) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(R0, R1)`` for the call's image tokens, ``[B, N, 1]`` each."""
        mask = None if self.router_mask is None else call.image_region(self.router_mask, self._mask_cache, self.label)
        if self.router == "mask":
            return route_from_mask(mask)
        share = None
        for stage in self.identity_stages:
            s = identity_share(stage, call, self._share_cache)
            if s is not None:
                share = s if share is None else share + s
        if share is None:
            share = call.q.new_zeros(call.batch, call.image_tokens, 1)
        r0, r1 = route_from_identity_share(share.clamp(0.0, 1.0), self.temperature)
        if mask is not None:
            r1 = r1 * mask
            r0 = 1.0 - r1
        return r0, r1

    def forward(self, call: DitCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        m = call.text_tokens
        r0, r1 = self.route(call)
        self._record(call, r1)
        image = out[:, m:]
        routed = mixture_of_attention(call.host_out[:, m:], image, r0, r1)
        w = self.schedule.weight
        new = routed if w == 1.0 else torch.lerp(image, routed, w)
        return torch.cat([out[:, :m], new], dim=1)

    def _record(self, call: DitCall, r1: torch.Tensor) -> None:
        grid = call.patch_grid()
        if self.recorder is None or grid is None:
            return
        sigmas = call.options.get("sigmas")
        if torch.is_tensor(sigmas) and self._sigma[0] is not sigmas:  # one read per model call: every block gets the same tensor
            self._sigma = (sigmas, float(sigmas.detach().reshape(-1)[0]))
        sigma = self._sigma[1] if torch.is_tensor(sigmas) else (None if sigmas is None else float(sigmas))
        self.recorder.record(sigma, call.chunks, grid, r1[:, : grid[0] * grid[1], 0])


def dit_moa_stages(model):
    """The DiT mixture-of-attention stages on ``model``, in node order."""
    dit = installed_dit_dispatcher(model)
    return [s for s in (dit.stages if dit else ()) if isinstance(s, DitMixtureOfAttentionStage)]


def apply_moa_dit(model, router, weight, start_percent, end_percent, apply_to, temperature, record_maps, mask, prior, node: str):
    """The node's Flux path (weight, temperature and prior names checked by the node); returns the patched clone."""
    from ..dispatch.stage_inputs import build_schedule, validate_mask

    family = FAMILY_NAMES[dit_family(model)]
    if router == "learned":
        raise IdentityAttentionError(
            f"learned router weights are trained per UNet cross-attention layer; {family} has no such layers",
            node=node, input_name="router", fix="use the identity_attention or mask router on Flux",
        )
    if router not in DIT_ROUTERS:
        raise IdentityAttentionError(f"unknown router {router!r}", node=node, input_name="router", fix=f"choose one of: {', '.join(DIT_ROUTERS)}")
    if prior != "current":
        raise IdentityAttentionError(
            f"the base prior re-projects each layer's inputs with the loaded q/k/v weights; on {family} the attention hook sees "
            "q/k/v after the block's projections, norms and RoPE, not the block's inputs",
            node=node, input_name="prior", fix="set prior to current on Flux (the attention as the model arrives here, LoRAs included)",
        )
    schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, None, node=node)
    router_mask = validate_mask(mask, node) if mask is not None else None
    if router == "mask" and router_mask is None:
        raise IdentityAttentionError("the mask router needs a mask", node=node, input_name="mask", fix="connect a MASK (white where the identity goes), or pick another router")
    dit = installed_dit_dispatcher(model)
    identity_stages = [s for s in (dit.stages if dit else ()) if isinstance(s, (DitJointIdentityStage, DitKVMixedStage))]
    if router == "identity_attention" and not identity_stages:
        raise IdentityAttentionError(
            "the identity_attention router follows the identity attention applied before it, but this MODEL has none",
            node=node, input_name="model", fix="put this node after 'Apply parallel visual attention' or 'Apply KV-mixed attention', or use the mask router",
        )
    stage = DitMixtureOfAttentionStage(
        schedule, router, temperature, router_mask, identity_stages if router == "identity_attention" else (),
        RouterRecorder() if record_maps else None, label=f"{node} ({router}, {family}, prior current)",
    )
    return apply_dit_stage(model, stage, node=node)
