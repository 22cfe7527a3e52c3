"""PVA's per-identity personalization ("40 steps") on a ComfyUI MODEL / CLIP / VAE.

:func:`personalize_identity` is what the "Personalize identity" node runs, and what the
benchmark harness times. Following PVA's fine-tune (``script/finetune.py``,
``config/SDI2_PVA_FT40.json``; recipe in ``adapters/training/training_schedule.py``):

- trainable: ``to_visual_{q,k,v}`` of every cross-attention layer and the ``<new1>`` prompt
  token; frozen: UNet, text encoder, VAE, identity transformer (``nodes/training/pva_training.py``);
- data: the reference photos (a square crop, centred on the face mask when given, else the middle;
  ``resolution`` px), one per micro-step, each with one of ``mask_pool`` random inpainting-style
  face masks (``adapters/training/training_masks.py``, around the artist's MASK when given), prompt
  "photo of a <new1> person";
- per micro-step ``time_resample`` noisy copies of that image at stratified timesteps (a batch),
  eps-MSE (``adapters/training/training_losses.py``): for inpainting models (9-channel input) the UNet
  gets ``[noisy latent, hole mask, latent of the photo with the hole grey]`` and the loss is
  PVA's, over the whole image; other models get a loss weighted 1 inside the mask and
  ``background_weight`` outside;
- AdamW, ``grad_accum`` micro-steps per optimizer step, ``steps`` optimizer steps;
- deterministic for a seed (every micro-step draws from its own seeded generator);
- memory: gradient checkpointing per transformer block on every device (the CPU too: without it a
  512 px run on the tiny test model peaked near 8 GB), an estimate before anything is computed
  (:func:`check_training_memory`: refused, naming the resolution that fits, when it exceeds the
  device's memory), autocast to the model's half
  precision (bf16 when the model is fp32 and the GPU has it; a gradient scaler with fp16),
  all VAE work before training so ComfyUI never swaps models mid-run.

Identity tokens come from the ID_ADAPTER's projector on the IDENTITY (computed once, frozen);
``per_reference`` decides fused vs per-reference tokens and must match the "references" setting
later used in "Apply parallel visual attention".
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional

import torch

import comfy.model_management

from ...adapters.projectors.id_adapter import IdAdapter
from ...adapters.faces.identity import Identity
from ...adapters.training.training_losses import denoising_loss, loss_weight_map
from ...adapters.training.training_masks import inpaint_mask, list_of_masks, mask_centre, mask_pool, masked_pixels, square_crop_resize, to_latent
from ...adapters.training.training_schedule import PersonalizeRecipe, check_recipe, sigmas_for, step_generator, stratified_timesteps
from ..dispatch.differentiable_unet import TrainingModels, as_normal, differentiable_clone, differentiable_text_encoder, predict_x0, training_transformer_options
from ..common.errors import IdentityAttentionError
from ..common.recognizer_check import check_recognizer
from ..common.host import base_model_of, model_sampling
from ..dispatch.prompt_token import DEFAULT_TEMPLATE, PLACEHOLDER, encode_tokens, find_prompt_token, initial_vectors, token_clip, with_marker
from .pva_training import PVATarget, stored_vectors
from .training_targets import TrainingFeed

log = logging.getLogger("identity_attention")


@dataclass
class PersonalizeResult:
    adapter: IdAdapter
    losses: List[float]
    vectors: Dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0  # the whole call: data preparation (VAE), loading, training, export
    train_seconds: float = 0.0  # the optimizer steps alone (models loaded, each step synchronised)
    copied_layers: int = 0


# --- inputs ---------------------------------------------------------------------------------------


def check_inputs(model, images: torch.Tensor, masks: Optional[torch.Tensor], adapter, identity, node: str) -> None:
    if not isinstance(adapter, IdAdapter):
        raise IdentityAttentionError(f"expected an ID_ADAPTER, got {type(adapter).__name__}", node=node, input_name="id_adapter", fix="connect 'Load identity adapter'")
    if not isinstance(identity, Identity):
        raise IdentityAttentionError(f"expected an IDENTITY, got {type(identity).__name__}", node=node, input_name="identity", fix="connect an identity encoder node fed with the same photos")
    if images.dim() != 4 or images.shape[-1] < 3:
        raise IdentityAttentionError(f"reference images have shape {list(images.shape)}", node=node, input_name="images", fix="connect an IMAGE (a batch of photos)")
    if masks is not None:
        if masks.dim() == 2:
            masks = masks[None]
        if masks.shape[-2:] != images.shape[1:3]:
            raise IdentityAttentionError(
                f"the masks are {masks.shape[-1]}x{masks.shape[-2]} but the images {images.shape[2]}x{images.shape[1]}",
                node=node, input_name="masks", fix="give masks of the same size as the photos (e.g. the encoder's face masks)",
            )
        if masks.shape[0] not in (1, images.shape[0]):
            raise IdentityAttentionError(
                f"{masks.shape[0]} masks for {images.shape[0]} images", node=node, input_name="masks", fix="give one mask for all photos or one per photo",
            )
    base = base_model_of(model)
    if base != "unknown" and adapter.base != base:
        raise IdentityAttentionError(f"this adapter was made for {adapter.base} but the model is {base}", node=node, input_name="id_adapter", fix=f"load a {base} adapter")
    if adapter.projector is None:
        raise IdentityAttentionError("this adapter has no token projector, so the identity cannot become tokens", node=node, input_name="id_adapter", fix="load a PVA adapter with its identity transformer")


def latent_channels(model) -> int:
    return int(getattr(getattr(model.model, "latent_format", None), "latent_channels", 4) or 4)


def is_inpainting(model) -> bool:
    """9-channel UNets (latent + hole mask + masked latent), as ComfyUI's inpainting checkpoints."""
    c = latent_channels(model)
    return int(getattr(model.model.diffusion_model, "in_channels", c)) == 2 * c + 1


@torch.no_grad()
def encode_latents(vae, model, pixels: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """Pixels ``[B, H, W, 3]`` -> the model's latents ``[B, C, h, w]`` (``process_latent_in`` applied), on the CPU."""
    out = []
    for i in range(0, pixels.shape[0], batch):
        out.append(vae.encode(pixels[i : i + batch, :, :, :3]).float().cpu())
    return model.model.process_latent_in(torch.cat(out))


def identity_tokens(adapter: IdAdapter, identity: Identity, per_reference: bool, node: str) -> torch.Tensor:
    check_recognizer(adapter, identity, node, "id_adapter", "identity")
    try:
        return adapter.identity_tokens(identity, per_reference=per_reference).cond.detach().float().cpu()
    except (ValueError, TypeError, AttributeError, KeyError, RuntimeError) as err:
        raise IdentityAttentionError(
            f"the adapter could not make tokens from this identity ({err})", node=node, input_name="identity",
            fix="encode the identity with the features this adapter reads",
        ) from err


# --- the loop -------------------------------------------------------------------------------------


def autocast_dtype(model, device: torch.device) -> Optional[torch.dtype]:
    """Half precision for the forward on GPUs (the model's own half dtype, else bf16 when supported)."""
    if device.type != "cuda":
        return None
    dtype = model.model.get_dtype()
    if dtype in (torch.float16, torch.bfloat16):
        return dtype
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def training_bytes(model, batch: int, latent_hw, checkpoint: bool) -> int:
    """Activation memory of one training micro-step: ComfyUI's inference estimate for the batch, x2 with
    gradient checkpointing (one block's activations are recomputed at a time), x6 without (all kept for backward)."""
    if not hasattr(model.model, "memory_required"):
        return 0
    return int(model.model.memory_required([batch, int(model.model.diffusion_model.in_channels), *latent_hw]) * (2 if checkpoint else 6))


def check_training_memory(model, batch: int, resolution: int, checkpoint: bool, device, node: str) -> None:
    """Refuse a run whose estimate exceeds the device's memory minus the UNet's weights, naming the resolution that fits.

    The budget is the device's TOTAL memory (not its free memory: ComfyUI unloads other models
    before training), so only runs that cannot fit at all are refused.
    """
    import comfy.model_management as mm

    latent = lambda r: (r // 8, r // 8)  # noqa: E731 - SD's VAE downscales by 8
    need = training_bytes(model, batch, latent(resolution), checkpoint)
    try:
        budget = int(mm.get_total_memory(device)) - int(model.model_size())
    except Exception:  # noqa: BLE001 - a host without these helpers: no estimate, no refusal
        return
    if not need or need <= budget:
        return
    fits = next((r for r in range(resolution - 64, 63, -64) if training_bytes(model, batch, latent(r), checkpoint) <= budget), None)
    gib = lambda b: f"{b / 1024**3:.1f} GB"  # noqa: E731
    raise IdentityAttentionError(
        f"training at {resolution} px needs about {gib(need)} for activations on {device} (with gradient checkpointing), "
        f"more than the {gib(max(budget, 0))} left after the model's weights",
        node=node, input_name="resolution",
        fix=(f"use resolution {fits} or lower" if fits else "train on a device with more memory") + " (or fewer photos / a GPU with more memory)",
    )


def personalize_identity(
    model,
    clip,
    vae,
    images: torch.Tensor,
    adapter: IdAdapter,
    identity: Identity,
    masks: Optional[torch.Tensor] = None,
    recipe: PersonalizeRecipe = PersonalizeRecipe(),
    template: str = DEFAULT_TEMPLATE,
    per_reference: bool = False,
    resolution: int = 512,
    train_token: bool = True,
    gradient_checkpointing: Optional[bool] = None,
    progress: Optional[Callable[[int, int, float, List[float]], None]] = None,
    node: str = "Personalize identity",
) -> PersonalizeResult:
    """Fine-tune PVA's visual projections (+ prompt token) on one identity; returns the new ID_ADAPTER.

    ``images`` ``[R, H, W, 3]`` in [0, 1]; ``masks`` ``[R or 1, H, W]`` (1 = face) or None.
    ``progress(step, total, loss, losses)`` is called after every optimizer step (it may raise
    to stop, e.g. ComfyUI's interrupt). Nothing of ``model`` / ``clip`` / ``vae`` is changed.
    """
    problem = check_recipe(recipe)
    if problem:
        raise IdentityAttentionError(problem, node=node, fix="use the defaults (PVA's 40-step recipe)")
    check_inputs(model, images, masks, adapter, identity, node)
    if resolution % 8:
        raise IdentityAttentionError(f"resolution {resolution} is not a multiple of 8", node=node, input_name="resolution", fix="use 512 (SD1.5) or 1024 (SDXL)")
    started = time.perf_counter()
    device = model.load_device
    checkpoint = True if gradient_checkpointing is None else bool(gradient_checkpointing)
    check_training_memory(model, recipe.time_resample, resolution, checkpoint, device, node)
    gen = torch.Generator().manual_seed(recipe.seed)

    # data (all VAE work before the models are loaded for training)
    refs = images.shape[0]
    base_masks, centres = None, None
    if masks is not None:  # square crops centred on the face, so a face off the middle of a wide photo stays in
        m = list_of_masks((masks[None] if masks.dim() == 2 else masks).float().cpu(), refs)
        centres = [mask_centre(b) for b in m]
        base_masks = square_crop_resize(torch.stack(m)[..., None], resolution, centres)[..., 0]
    pixels = square_crop_resize(images[..., :3].float().cpu(), resolution, centres)
    pools = torch.stack([mask_pool(b, (resolution, resolution), recipe.mask_pool, gen) for b in list_of_masks(base_masks, refs)])  # [R, K, H, W]
    latents = encode_latents(vae, model, pixels)  # [R, C, h, w]
    hw = tuple(latents.shape[-2:])
    inpaint = is_inpainting(model)
    masked_latents = None
    if inpaint:
        holes = pools.flatten(0, 1)
        masked = masked_pixels(pixels.repeat_interleave(recipe.mask_pool, dim=0), holes)
        masked_latents = encode_latents(vae, model, masked).reshape(refs, recipe.mask_pool, *latents.shape[1:])
    tokens = identity_tokens(adapter, identity, per_reference, node)

    # trainable parts and the training clones
    token = find_prompt_token(clip, template, PLACEHOLDER, node) if PLACEHOLDER in template else None
    train_token = bool(train_token and token is not None and recipe.token_learning_rate > 0)
    vectors0 = initial_vectors(token, stored_vectors(adapter)) if token is not None else None
    target = PVATarget(model, adapter, token_vectors=vectors0, token_learning_rate=recipe.token_learning_rate, node=node)
    if target.tokens is not None and not train_token:
        target.tokens.requires_grad_(False)
    feed = TrainingFeed()
    unet = differentiable_clone(target.install(model, feed), checkpoint=checkpoint)
    tclip = token_clip(clip, token, target.prompt_vectors()) if token is not None else clip.clone()
    if train_token and token is not None:
        tclip = differentiable_text_encoder(tclip)
    prompt = clip.tokenize(with_marker(template, PLACEHOLDER, token.marker) if token is not None else template)
    sigma_table = model_sampling(model).sigmas
    amp = autocast_dtype(model, device)
    n = recipe.time_resample
    bytes_needed = training_bytes(model, n, hw, checkpoint)

    losses: List[float] = []
    with torch.inference_mode(False), torch.enable_grad():
        target.module.to(device)
        groups = target.param_groups(recipe.learning_rate, recipe.weight_decay)
        groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
        optimizer = torch.optim.AdamW(groups, betas=tuple(recipe.betas), eps=recipe.eps)
        scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        feed.tokens = as_normal(tokens).to(device)
        fixed_context = None
        with TrainingModels([unet, tclip.patcher], weight_roots=[unet.model, tclip.cond_stage_model], memory_required=bytes_needed):
            options = training_transformer_options(unet)
            train_started = time.perf_counter()
            for step in range(recipe.steps):
                step_loss = torch.zeros((), device=device)
                for micro in range(recipe.grad_accum):
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    g = step_generator(recipe.seed, step, micro)
                    r = int(torch.randint(0, refs, (), generator=g))
                    k = int(torch.randint(0, recipe.mask_pool, (), generator=g))
                    t = stratified_timesteps(n, g, total=len(sigma_table))
                    sigma = sigmas_for(t, sigma_table)
                    eps = torch.randn((n, *latents.shape[1:]), generator=g)
                    x0 = latents[r : r + 1].expand(n, -1, -1, -1)
                    x_noisy = (x0 + sigma.reshape(-1, 1, 1, 1) * eps).to(device)
                    if train_token or fixed_context is None:
                        context, pooled = encode_tokens(tclip, prompt)
                        if not train_token:
                            context, pooled = context.detach(), (pooled.detach() if pooled is not None else None)
                            fixed_context = (context, pooled)
                    else:
                        context, pooled = fixed_context
                    context = context.to(device).expand(n, -1, -1)
                    y = adm_vector(model, pooled, resolution, n, device)
                    c_concat = None
                    if inpaint:
                        hole = inpaint_mask(pools[r, k : k + 1], hw).expand(n, -1, -1, -1)
                        c_concat = torch.cat([hole, masked_latents[r, k : k + 1].expand(n, -1, -1, -1)], dim=1).to(device)
                        weight = None
                    else:
                        weight = loss_weight_map(to_latent(pools[r, k : k + 1], hw), recipe.background_weight).expand(n, -1, -1, -1).to(device)
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        x0_hat = predict_x0(unet, x_noisy, sigma.to(device), context, c_concat=c_concat, y=y, transformer_options=options)
                    loss = denoising_loss(x0_hat, x_noisy, sigma.to(device), eps.to(device), weight)
                    scaled = loss / recipe.grad_accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    step_loss += loss.detach() / recipe.grad_accum
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_loss = float(step_loss)  # one host sync per optimizer step
                losses.append(step_loss)
                if not math.isfinite(step_loss):
                    raise IdentityAttentionError(
                        f"the loss became {step_loss} at step {step + 1}", node=node, input_name="learning_rate", fix="lower the learning rate",
                    )
                if progress is not None:
                    progress(step + 1, recipe.steps, step_loss, losses)
            train_seconds = time.perf_counter() - train_started
    meta = {
        "trained": f"PVA personalization: {recipe.steps} steps, lr {recipe.learning_rate:g}, token lr {recipe.token_learning_rate:g}, seed {recipe.seed}",
        "references": str(refs),
        "per_reference": str(bool(per_reference)),
        "template": template,
        "resolution": str(resolution),
    }
    result = target.export(adapter.base, adapter.context_dim, meta)
    vectors = target.tokens.export() if target.tokens is not None else {}
    return PersonalizeResult(result, losses, vectors, time.perf_counter() - started, train_seconds, target.copied_layers)


def adm_vector(model, pooled: Optional[torch.Tensor], resolution: int, rows: int, device) -> Optional[torch.Tensor]:
    """SDXL's ``y`` (pooled text + size embeddings) for square ``resolution`` images; None for SD1.5 / SD2."""
    if getattr(model.model, "adm_channels", 0) in (0, None) or pooled is None:
        return None
    y = model.model.encode_adm(pooled_output=pooled.float(), width=resolution, height=resolution, crop_w=0, crop_h=0, target_width=resolution, target_height=resolution)
    return None if y is None else y.to(device).expand(rows, -1)


def recipe_from(steps: int, learning_rate: float, token_learning_rate: float, seed: int, base: PersonalizeRecipe = PersonalizeRecipe()) -> PersonalizeRecipe:
    return replace(base, steps=int(steps), learning_rate=float(learning_rate), token_learning_rate=float(token_learning_rate), seed=int(seed))


def synthetic_personalization_inputs(model, references: int = 2, resolution: int = 512, seed: int = 0):
    """``(images, adapter, identity)`` for timing :func:`personalize_identity` without photos or weights.

    Random smooth photos ``[R, resolution, resolution, 3]``, an IDENTITY of random ArcFace-sized
    embeddings, and a fresh PVA adapter for ``model`` (PVA's identity transformer shape; visual
    projections start as copies of the layers', as PVA does).
    """
    from ...adapters.faces.identity import FaceRecord
    from .pva_training import fresh_pva_adapter

    gen = torch.Generator().manual_seed(seed)
    small = torch.rand(references, 3, 8, 8, generator=gen)
    images = torch.nn.functional.interpolate(small, size=(resolution, resolution), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).contiguous()
    faces = tuple(
        FaceRecord(
            image_index=i, image_size=(resolution, resolution), bbox=torch.tensor([0.2, 0.2, 0.8, 0.8]) * resolution,
            landmarks=torch.rand(5, 2, generator=gen) * resolution, det_score=0.9, embedding=torch.randn(512, generator=gen) * 20.0,
            crop=torch.rand(112, 112, 3, generator=gen),
        )
        for i in range(references)
    )
    return images, fresh_pva_adapter(model, {}, seed), Identity(faces=faces, recognizer="synthetic")
