"""Display nodes: show a text output (adapter info, attention report) on the canvas.

ComfyUI's core has no node that shows a STRING, so the reports of this pack
(Load identity adapter's ``info``, Show attention patches' ``report``) would need
another pack. :class:`ShowText` returns the text as UI output; the page extension
``web/show_text.js`` writes it into a read-only box on the node.
"""

from __future__ import annotations

from ..dispatch.stage_inputs import CATEGORY


class ShowText:
    NODE_ID = "IdentityAttentionShowText"
    DISPLAY_NAME = "Show text"
    CATEGORY = f"{CATEGORY}/inspect"
    DESCRIPTION = (
        "Shows a text on the node when the workflow runs, e.g. what Load identity adapter found in a file "
        "or the report of Show attention patches. The text is also passed on."
    )
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    OUTPUT_TOOLTIPS = ("The same text, for nodes that take a STRING.",)
    OUTPUT_NODE = True
    FUNCTION = "show"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True, "tooltip": "The text to show: connect info or report outputs here."})}}

    def show(self, text):
        return {"ui": {"text": [str(text)]}, "result": (text,)}


NODES = [ShowText]
