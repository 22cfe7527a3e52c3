"""PuLID-Flux on a ComfyUI Flux MODEL: ``patches_replace["dit"]`` replaces after the scheduled blocks.

The official model adds ``id_weight * pulid_ca[j](id, img)`` to the image tokens after double block
i (i % 2 == 0) and single block i (i % 4 == 0) (adapters/flux/pulid_flux.py). Here, on a clone of the MODEL,
each of those blocks' ``("double_block", i)`` / ``("single_block", i)`` replace runs the block through
the replace that was there before (another pack's, or this pack's DiT dispatcher), else the original
block, and then adds the identity to its output:

- double block: ``out["img"]`` ``[B, N, C]``; the text length is noted in ``transformer_options`` for
  the single blocks (double block 0 is always scheduled, so it is known before any single block);
- single block: ``out["img"]`` is ``[txt; img]`` ``[B, M+N, C]``: only the last N rows change.

Rows: ComfyUI batches cond and uncond (``cond_or_uncond``); cond rows get the id tokens of the face, uncond
rows the encoder's tokens for all-zero inputs (the official true-CFG negative). ``apply_to`` leaves the other
chunk's rows bit for bit as the block gave them. Window: ``start_at``/``end_at`` as sigmas (the official
``start_step`` as a percent); outside it, weight 0 or an empty schedule the block output is returned as is.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch

from ...adapters.projectors.id_adapter import IdentityTokens
from ...adapters.flux.pulid_flux import PuLIDFlux, add_identity, add_identity_single, ca_index
from ..dispatch.dispatcher import StageSchedule
from ..common.dit_layout import dit_blocks

_TXT_LEN = "identity_attention_pulid_flux_txt_len"


def row_tokens(tokens: IdentityTokens, chunks, batch: int) -> torch.Tensor:
    """``[B, T, D]``: per batch row the cond or uncond id tokens (ComfyUI splits the batch evenly by chunk)."""
    chunks = list(chunks) or [0]
    per = batch // len(chunks)
    return torch.cat([(tokens.cond if code == 0 else tokens.uncond).expand(per, -1, -1) for code in chunks], dim=0)


class PuLIDFluxReplace:
    """The replace installed on one scheduled block; ``previous`` is the replace it found there (or None)."""

    def __init__(self, kind: str, block: int, ca, tokens: IdentityTokens, schedule: StageSchedule, previous: Optional[Callable]):
        self.kind, self.block, self.ca = kind, block, ca
        self.tokens, self.schedule, self.previous = tokens, schedule, previous
        self._copies = {}

    def _ca_for(self, img: torch.Tensor):
        """The module on the image's device and dtype (a cached copy; the loaded one stays where it is)."""
        key = (img.device, img.dtype)
        if key not in self._copies:
            p = next(self.ca.parameters())
            self._copies[key] = self.ca if (p.device, p.dtype) == key else copy.deepcopy(self.ca).to(img.device, img.dtype)
        return self._copies[key]

    def __deepcopy__(self, memo):
        return self

    def _active_rows(self, options: dict, batch: int, device):
        """``None`` when nothing applies this call, ``True`` when every row does, else a ``[B, 1, 1]`` bool row
        mask on ``device`` (a window on an accelerator stays a tensor there: no host sync)."""
        if self.schedule.weight == 0:
            return None
        window = self.schedule.window(options.get("sigmas"))
        if window is False:
            return None
        chunks = list(options.get("cond_or_uncond") or [0])
        keep = [self.schedule.applies_to_chunk(code) for code in chunks]
        if not any(keep):
            return None
        if all(keep) and window is True:
            return True
        per = batch // len(chunks)
        rows = torch.tensor([k for k in keep for _ in range(per)], device=device).reshape(batch, 1, 1)
        return rows if window is True else rows & window.reshape(1, 1, 1).to(device)

    def __call__(self, args, extra):
        options = args.get("transformer_options") or {}
        if self.kind == "double_block":
            options[_TXT_LEN] = args["txt"].shape[1]
        out = self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        img = out["img"]
        rows = self._active_rows(options, img.shape[0], img.device)
        if rows is None:
            return out
        ids = row_tokens(self.tokens, options.get("cond_or_uncond") or [0], img.shape[0])
        w = self.schedule.weight
        if self.kind == "double_block":
            new = add_identity(self._ca_for(img), img, ids, w)
        else:
            new = add_identity_single(self._ca_for(img), img, int(options[_TXT_LEN]), ids, w)
        if rows is not True:
            new = torch.where(rows, new, img)
        out = dict(out)
        out["img"] = new
        return out


def apply_pulid_flux(model_patcher, pulid: PuLIDFlux, tokens: IdentityTokens, schedule: StageSchedule):
    """A clone of the Flux ``model_patcher`` with PuLID-Flux after its scheduled blocks (upstream untouched).

    tokens: ``cond``/``uncond`` ``[1, 32, 2048]`` from ``pulid.encoder``. The caller checks the family
    and ``pulid.check_model`` first.
    """
    blocks = dit_blocks(model_patcher)
    n_double = sum(1 for b in blocks if b.kind == "double_block")
    m = model_patcher.clone()
    if schedule.weight == 0:
        return m  # nothing that runs
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for b in blocks:
        kind = "double" if b.kind == "double_block" else "single"
        j = ca_index(kind, b.key[1], n_double)
        if j is None:
            continue
        replace = PuLIDFluxReplace(b.kind, b.key[1], pulid.ca[j], tokens, schedule, existing.get(b.key))
        m.set_model_patch_replace(replace, "dit", b.key[0], b.key[1])
    return m
