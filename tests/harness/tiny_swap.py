"""Make an example workflow runnable on the built-in tiny models.

Example workflows name the real files artists download (checkpoints, adapters,
face models). On a test or demo host none exist, so before a workflow runs:

- loader nodes of base models are swapped for the test kit's tiny-model node
  (the base model is read from the file name the workflow asks for);
- other weight files a workflow names are *provisioned*: a synthetic file of
  the same format, with shapes that fit the tiny models, is written into the
  instance under the same name, so the real loader nodes of this pack run
  unchanged (format detection included);
- reference images a workflow names are provisioned as generated pictures.

Provisioners register themselves per node type in ``PROVISIONERS``; each
mechanism adds its own as it lands.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict

from .host import Instance

SDXL_HINTS = ("xl", "sdxl", "pony", "illustrious", "juggernautxl")


def arch_of_checkpoint(name: str) -> str:
    """"sdxl" for SDXL-family checkpoint names, else "sd15"."""
    lowered = name.lower()
    return "sdxl" if any(h in lowered for h in SDXL_HINTS) else "sd15"


def _swap_checkpoint(node: dict, instance: Instance, context: dict) -> dict:
    arch = arch_of_checkpoint(str(node["inputs"].get("ckpt_name", "")))
    context.setdefault("arch", arch)
    return {"class_type": "IdentityAttentionTestKit_TinyModels", "inputs": {"arch": arch, "seed": 0}}


# node type -> function(node, instance, context) -> replacement node (or the node itself)
PROVISIONERS: Dict[str, Callable[[dict, Instance, dict], dict]] = {
    "CheckpointLoaderSimple": _swap_checkpoint,
}


def register(class_type: str):
    """Decorator: ``@register("LoadImage") def provision(node, instance, context) -> node``."""

    def wrap(fn):
        known = PROVISIONERS.get(class_type)
        if known is not None and known is not fn:  # two modules provisioning one node: the last import would win silently
            raise RuntimeError(f"{class_type} already has a provisioner ({known.__module__}.{known.__name__})")
        PROVISIONERS[class_type] = fn
        return fn

    return wrap


def for_tiny_models(prompt: Dict[str, dict], instance: Instance, sampler_steps: int = 3, max_side: int = 64) -> Dict[str, dict]:
    """A copy of an API prompt that runs on the tiny models in ``instance``.

    Also shrinks the work: sampler steps to ``sampler_steps`` and empty
    latents to at most ``max_side`` pixels, so every example runs in seconds
    on a CPU.
    """
    prompt = copy.deepcopy(prompt)
    context: dict = {}
    # base-model loaders first, so provisioners know the architecture
    ordered = sorted(prompt.items(), key=lambda item: item[1]["class_type"] != "CheckpointLoaderSimple")
    for node_id, node in ordered:
        provision = PROVISIONERS.get(node["class_type"])
        if provision is not None:
            prompt[node_id] = provision(node, instance, context)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] in ("KSampler", "KSamplerAdvanced") and isinstance(inputs.get("steps"), int):
            inputs["steps"] = min(inputs["steps"], sampler_steps)
            if "end_at_step" in inputs and isinstance(inputs["end_at_step"], int):
                inputs["end_at_step"] = min(inputs["end_at_step"], sampler_steps)
        if node["class_type"] == "EmptyLatentImage":
            for side in ("width", "height"):
                if isinstance(inputs.get(side), int):
                    inputs[side] = min(inputs[side], max_side)
    return prompt
