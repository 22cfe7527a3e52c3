"""Small builders for API-format prompts used by the host tests."""

from __future__ import annotations

import itertools
from typing import Any, Dict, Optional, Tuple

from safetensors.torch import load_file

Link = Tuple[str, int]


class Graph:
    """An API-format prompt being built: ``g.add("KSampler", model=..., ...)`` returns a node id."""

    def __init__(self):
        self.nodes: Dict[str, Dict[str, Any]] = {}
        self._ids = itertools.count(1)

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(next(self._ids))
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    @staticmethod
    def out(node_id: str, index: int = 0) -> Link:
        return [node_id, index]

    def prompt(self) -> Dict[str, Any]:
        return self.nodes


def tiny_txt2img(
    arch: str = "sd15",
    size: int = 64,
    steps: int = 3,
    seed: int = 1,
    cfg: float = 5.0,
    patch=None,
    save: str = "latent",
    prefix: str = "test",
    batch: int = 1,
) -> Tuple[Graph, Dict[str, str]]:
    """Tiny models -> (optional patch nodes) -> KSampler -> SaveLatent / SaveImage.

    ``patch(graph, model_link, ids) -> model_link`` inserts patch nodes.
    Returns the graph and the ids of its main nodes.
    """
    g = Graph()
    ids = {}
    ids["models"] = g.add("IdentityAttentionTestKit_TinyModels", arch=arch, seed=0)
    model, clip, vae = g.out(ids["models"], 0), g.out(ids["models"], 1), g.out(ids["models"], 2)
    ids["pos"] = g.add("CLIPTextEncode", clip=clip, text="a portrait photo of a person")
    ids["neg"] = g.add("CLIPTextEncode", clip=clip, text="blurry, lowres")
    ids["latent"] = g.add("EmptyLatentImage", width=size, height=size, batch_size=batch)
    if patch is not None:
        model = patch(g, model, ids)
    ids["sampler"] = g.add(
        "KSampler",
        model=model,
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name="euler",
        scheduler="normal",
        positive=g.out(ids["pos"]),
        negative=g.out(ids["neg"]),
        latent_image=g.out(ids["latent"]),
        denoise=1.0,
    )
    if save in ("latent", "both"):
        ids["save_latent"] = g.add("SaveLatent", samples=g.out(ids["sampler"]), filename_prefix=f"latents/{prefix}")
    if save in ("image", "both"):
        ids["decode"] = g.add("VAEDecode", samples=g.out(ids["sampler"]), vae=vae)
        ids["save_image"] = g.add("SaveImage", images=g.out(ids["decode"]), filename_prefix=prefix)
    return g, ids


def run_for_latent(server, graph: Graph):
    """Run a prompt that saves exactly one latent; returns it as a tensor."""
    entry = server.run(graph.prompt())
    files = server.output_files(entry, "latents")
    assert len(files) == 1, f"expected one saved latent, got {files}"
    return load_file(str(files[0]))["latent_tensor"]
