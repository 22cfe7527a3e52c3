"""Training target ``pva`` on a Flux.1 MODEL: PVA's identity transformer through joint identity attention.

On Flux (nodes/pva/dit_joint_identity.py) the identity tokens are text-side tokens: they enter
through the model's ``txt_in`` and each block's own text-side modulation, norm, ``qkv`` and key
norm, and the image queries attend over ``[txt; img; id]`` in one softmax. Flux has no
cross-attention layer for PVA's ``to_visual_{q,k,v}``, so the only trainable part is the
**identity transformer** (``adapters/projectors/projector_pva.py``), which maps ArcFace embeddings to
tokens of the text context's width (4096 for Flux.1's T5-XXL). What is trained is what
*Apply parallel visual attention* (mode joint, projections layer, weight 1, references
per_reference) computes on Flux; ``tests/test_flux_training.py`` checks the two forwards agree.

Choices (the papers train on UNets; these are ours):

- **one target name**: the trainer's ``pva`` builds this target when the MODEL is Flux, so one
  config trains either family; the rate is the projector's: ``projector_lr`` (absolute, as on
  UNets), else the usual ``learning_rate`` chain with default :data:`FLUX_PROJECTOR_LR` (PVA's
  stage-1 projector rate 3.2e-5, not the 1e-5 of projections).
- **objective**: Flux is a rectified-flow model. ComfyUI's ``model_sampling`` for Flux is
  ``CONST``: ``x_t = (1 - sigma) x0 + sigma noise``, the network predicts the velocity
  ``v = noise - x0`` and the sampler's denoised value is ``x_t - sigma v``. The loss is the
  (mask-weighted) MSE between ``(x_t - x0_hat) / sigma`` (the model's velocity) and
  ``noise - x0`` (``adapters/training_losses.flow_matching_loss``); sigmas are drawn, stratified
  as PVA draws timesteps, from the model's own sigma table (Flux's shifted schedule).
- **guidance**: Flux-dev takes a guidance value as an input; training uses ``guidance``
  (setting, default :data:`DEFAULT_GUIDANCE` = 3.5, the FluxGuidance node's default, so the
  model is trained at the conditioning it is sampled with). Schnell has no guidance input.
- **pooled text**: Flux's ``y`` is the pooled CLIP-L vector of the caption.
- **no prompt word**: the ``<new1>`` token of the UNet target is not trained on Flux (its text
  side is T5 through the pack's token CLIP, which only knows CLIP encoders); a caption with
  ``<new1>`` is refused with the fix.

Gradients through Flux's blocks: ComfyUI's double and single blocks add their residuals in
place (``img += ...``, ``x += ...``) after a LayerNorm saved the same tensor for backward, so
a backward pass fails. :func:`autograd_safe_flux` gives a clone whose block LayerNorms
(``img_norm1/2``, ``txt_norm1/2``, ``pre_norm``) read a copy of their input (object patches:
the upstream MODEL is unchanged; outputs equal bit for bit); the in-place add then changes a
tensor nothing saved. Cost: one copy of the stream per norm call while training. Gradient
checkpointing (the trainer's ``gradient_checkpointing``, on by default): :func:`checkpointed_flux`
runs every block under ``torch.utils.checkpoint`` (:class:`CheckpointedBlock`), one extra
forward of each block during backward instead of keeping all blocks' activations.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional

import torch
import torch.utils.checkpoint

from ...adapters.projectors.id_adapter import IdAdapter
from ...adapters.projectors.projectors import build_projector, projector_name
from ..dispatch.dispatcher import StageSchedule
from ..dispatch.dit_dispatcher import DitCall, DitStage, apply_dit_stage
from ..common.dit_layout import FLUX, DitBlock, context_width, dit_blocks, dit_family, identity_hidden, identity_key_value
from ..common.errors import IdentityAttentionError
from .training_targets import TrainingFeed, TrainingTarget

FLUX_PROJECTOR_LR = 3.2e-5
"""PVA stage 1's identity-transformer rate (the only trainable part on Flux)."""
DEFAULT_GUIDANCE = 3.5
"""Flux-dev's guidance input while training (FluxGuidance's default)."""
BLOCK_NORMS = {"double_block": ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2"), "single_block": ("pre_norm",)}
"""The LayerNorms whose input a Flux block later changes in place."""


# --- gradients through Flux blocks ---------------------------------------------------------------


class NormOnCopy(torch.nn.Module):
    """A block LayerNorm reading a copy of its input while gradients are recorded (see module docstring).

    Shares the norm's parameters and buffers; same values out.
    """

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self._modules = norm._modules
        self._parameters = norm._parameters
        self._buffers = norm._buffers
        self.__dict__["norm"] = norm

    def forward(self, x):
        return self.norm(x.clone() if torch.is_grad_enabled() else x)


def autograd_safe_flux(model_patcher):
    """A clone of a Flux MODEL whose blocks can be back-propagated through (object patches; upstream unchanged)."""
    clone = model_patcher.clone()
    for block in dit_blocks(model_patcher):
        prefix = f"diffusion_model.{'double_blocks' if block.kind == 'double_block' else 'single_blocks'}.{block.key[1]}"
        for name in BLOCK_NORMS[block.kind]:
            norm = getattr(block.module, name, None)
            if norm is None:
                continue
            if isinstance(norm, NormOnCopy):
                norm = norm.norm
            clone.add_object_patch(f"{prefix}.{name}", NormOnCopy(norm))
    return clone


class CheckpointedBlock:
    """A Flux block's ``dit`` replace (our dispatcher's) run under non-reentrant ``torch.utils.checkpoint``.

    The block's activations are recomputed during backward instead of kept. Two things the host
    changes after a block returns must not reach the recomputation: its ``original_block`` closes
    over the loop variable (by backward time, the last block), and the ``transformer_options``
    dict is edited (block index, our dispatcher's attention override removed after the forward).
    So the recomputation runs this block's own module, bound here, with a snapshot of the options;
    what the block call wrote into the snapshot (the dispatcher's text length) is copied back. The
    blocks also add into their input streams in place, so each run starts from a copy of them.
    """

    def __init__(self, replace: Callable, block: DitBlock):
        self.replace = replace
        self.block = block

    def __deepcopy__(self, memo):
        return self

    def _original(self, args: dict) -> dict:
        m, options = self.block.module, args.get("transformer_options")
        if self.block.kind == "double_block":
            img, txt = m(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"), transformer_options=options)
            return {"img": img, "txt": txt}
        return {"img": m(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"), transformer_options=options)}

    def _run(self, args: dict) -> dict:
        # the host's blocks add into their input streams in place: the recomputation must see them unchanged
        args = {k: (v.clone() if k in ("img", "txt") and isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        return self.replace(args, {"original_block": self._original})

    def __call__(self, args: dict, extra: dict) -> dict:
        live = args.get("transformer_options")
        if not torch.is_grad_enabled() or live is None:
            return self.replace(args, extra)
        snapshot = dict(live)
        out = torch.utils.checkpoint.checkpoint(self._run, dict(args, transformer_options=snapshot), use_reentrant=False)
        for k in [k for k in live if k not in snapshot]:
            live.pop(k)
        live.update(snapshot)
        return out


def checkpointed_flux(model_patcher):
    """A clone whose Flux blocks recompute their activations during backward (the trainer's gradient checkpointing).

    Wraps the ``dit`` block replaces our dispatcher installed (call after :func:`apply_dit_stage`).
    """
    clone = model_patcher.clone()
    table = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for block in dit_blocks(model_patcher):
        replace = table.get(block.key)
        if replace is None or isinstance(replace, CheckpointedBlock):
            continue
        clone.set_model_patch_replace(CheckpointedBlock(replace, block), "dit", block.key[0], block.key[1])
    return clone


# --- the training forward ------------------------------------------------------------------------


class TrainableFluxJointStage(DitStage):
    """Joint identity attention (nodes/pva/dit_joint_identity.py, weight 1) to the feed's tokens, per row.

    The feed's tokens ``[B or 1, T, context]`` change every step and differ per row (one identity
    per photo), so nothing is cached; ``txt_in`` and each block's text-side projections run on
    them in every block call, with gradients to the projector.
    """

    label = "PVA training (Flux)"

    def __init__(self, model_patcher, feed: TrainingFeed):
        super().__init__(StageSchedule())
        self.model_patcher = model_patcher
        self.feed = feed

    def forward(self, call: DitCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = call.q, call.k, call.v
        tokens = self.feed.tokens_for(call.batch)
        hidden = identity_hidden(self.model_patcher, tokens)  # [B, T, hidden]
        k_id, v_id = identity_key_value(call.block, hidden, call.vec, call.heads)  # [B, H, T, D]
        m = call.text_tokens
        keys = torch.cat([k, k_id.to(k.dtype)], dim=2)
        values = torch.cat([v, v_id.to(v.dtype)], dim=2)
        joint = torch.nn.functional.scaled_dot_product_attention(q[:, :, m:], keys, values)  # [B, H, N, D]
        joint = joint.transpose(1, 2).reshape(q.shape[0], q.shape[2] - m, -1).to(out.dtype)
        return torch.cat([out[:, :m], joint], dim=1)


class FluxPVATarget(TrainingTarget):
    """PVA's identity transformer on a Flux MODEL (see the module docstring)."""

    name = "pva"
    default_learning_rate = FLUX_PROJECTOR_LR
    needs_features = True

    def __init__(self, model_patcher, adapter: IdAdapter, guidance: float = DEFAULT_GUIDANCE, projector_learning_rate: Optional[float] = None, node: str = "train.py"):
        if adapter.projector is None:
            raise IdentityAttentionError("the adapter has no identity transformer to train", node=node, input_name="targets.pva.adapter")
        width = context_width(model_patcher)
        if adapter.token_dim != width:
            raise IdentityAttentionError(
                f"the adapter's identity transformer makes tokens {adapter.token_dim} wide, this Flux model's text context is {width} wide",
                node=node, input_name="targets.pva.adapter", fix=f"leave 'adapter' out to start a new one, or use one made for this model ({width}-wide tokens)",
            )
        self.adapter = adapter
        self.guidance = float(guidance)
        self.projector_learning_rate = projector_learning_rate
        with torch.inference_mode(False):
            state = {k: v.detach().float().cpu().clone() for k, v in adapter.projector.state_dict().items()}
            self.projector = build_projector(projector_name(adapter.projector), adapter.projector.config, state)
            self.projector.requires_grad_(True)
            self.module = torch.nn.ModuleDict({"projector": self.projector})

    def param_groups(self, learning_rate: float, weight_decay: float) -> List[dict]:
        lr = learning_rate if self.projector_learning_rate is None else float(self.projector_learning_rate)  # projector_lr: absolute, as PVA's
        return [{"params": list(self.projector.parameters()), "lr": lr, "weight_decay": weight_decay, "name": "pva.projector"}]

    def install(self, model_patcher, feed: TrainingFeed):
        return apply_dit_stage(autograd_safe_flux(model_patcher), TrainableFluxJointStage(model_patcher, feed), node="train.py")

    def prepare(self, feed: TrainingFeed) -> None:
        """This step's tokens: each sample's references in one sequence through the projector, repeated per noisy copy."""
        if feed.features is None:
            return
        feats = feed.features if isinstance(feed.features, (list, tuple)) else [feed.features]
        tokens = torch.cat([self.projector.project(f) for f in feats], dim=0)
        feed.tokens = tokens.repeat_interleave(int(feed.extras.get("repeat", 1)), dim=0)

    def model_inputs(self, model_patcher, pooled: Optional[torch.Tensor], rows: int, device) -> Dict[str, torch.Tensor]:
        """Flux's extra inputs for ``rows`` rows: ``y`` (pooled text ``[rows, P]``) and, for Flux-dev, ``guidance`` ``[rows]``."""
        net = model_patcher.model.diffusion_model
        out: Dict[str, torch.Tensor] = {}
        if pooled is not None:
            out["y"] = pooled.to(device).expand(rows, -1) if pooled.shape[0] == 1 else pooled.to(device)
        if getattr(getattr(net, "params", None), "guidance_embed", False):
            out["guidance"] = torch.full((rows,), self.guidance, device=device)
        return out

    def export(self, base: str, context_dim: int, metadata: Optional[Dict[str, str]] = None) -> IdAdapter:
        with torch.inference_mode(False):
            state = {k: v.detach().float().cpu().clone() for k, v in self.projector.state_dict().items()}
        projector = build_projector(projector_name(self.projector), self.projector.config, state)
        meta = {"source_format": "native", "trained_on": "flux", "guidance": f"{self.guidance:g}"}
        meta.update({k: v for k, v in self.adapter.metadata.items() if k in ("identity_input",)})
        meta.update(metadata or {})
        return IdAdapter(format="native", base=base, context_dim=context_dim, projector=projector, layers={}, extras={}, metadata=meta, mechanism="joint")


def is_flux(model_patcher) -> bool:
    return dit_family(model_patcher) == FLUX


def is_rectified_flow(model_patcher) -> bool:
    """Whether the MODEL samples as a rectified flow (ComfyUI's ``CONST``: Flux, SD3): ``x_t = (1 - sigma) x0 + sigma noise``."""
    import comfy.model_sampling

    const = getattr(comfy.model_sampling, "CONST", None)
    return const is not None and isinstance(model_patcher.model.model_sampling, const)


def fresh_flux_adapter(model_patcher, settings: Mapping, seed: int = 0) -> IdAdapter:
    """A new PVA identity transformer whose tokens are the Flux model's text width (PVA's shape otherwise)."""
    from ...adapters.projectors.projector_pva import PVATransformNetwork

    width = context_width(model_patcher)
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = PVATransformNetwork(
            in_dim=int(settings.get("embedding_dim", 512)), out_dim=width, num_q_token=int(settings.get("tokens", 10)),
            num_layer=int(settings.get("layers", 4)), heads=int(settings.get("heads", 8)), ff_dim=int(settings.get("ff_dim", 2048)),
        )
        with torch.no_grad():
            projector.q_tokens.normal_()
    return IdAdapter(format="native", base="flux", context_dim=width, projector=projector.eval(), mechanism="joint", metadata={"source_format": "native"})


def refuse_prompt_word() -> None:
    """The error for a caption with ``<new1>`` on Flux (see the module docstring)."""
    raise IdentityAttentionError(
        "on Flux the prompt word <new1> is not trained (only the identity transformer is), so the caption cannot use it",
        node="train.py", input_name="data.caption", fix='write captions without <new1>, e.g. "photo of a person"',
    )


def make_flux_pva_target(model_patcher, adapter: Optional[IdAdapter], settings: Mapping, seed: int = 0, token=None, **_) -> FluxPVATarget:
    """The ``pva`` trainer target on Flux (called by ``pva_training.make_pva_target``)."""
    if token is not None:
        refuse_prompt_word()
    if settings.get("train_projector", True) is False:
        raise IdentityAttentionError(
            "on Flux the identity transformer is the only trainable part of pva, so train_projector cannot be false",
            node="train.py", input_name="targets.pva.train_projector", fix="remove train_projector (or set it to true)",
        )
    if adapter is None:
        adapter = fresh_flux_adapter(model_patcher, settings, seed)
    return FluxPVATarget(model_patcher, adapter, guidance=float(settings.get("guidance", DEFAULT_GUIDANCE)), projector_learning_rate=settings.get("projector_lr"))
