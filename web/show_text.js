// Identity Attention: show the text of "Show text" nodes (IdentityAttentionShowText) on the node.
// The text arrives as the node's UI output ({text: [...]}) when the prompt runs; it is shown in a
// read-only box and never saved into the workflow, so saved workflows keep the node's widget list.
// The node's input is a socket (forceInput). Pages of early 2024 still create a text widget for it
// and hide it only for nodes added by hand, not for nodes loaded from a file: hide it here too.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE_ID = "IdentityAttentionShowText";
const BOX = "shown_text";

function showText(node, lines) {
	let box = node.widgets?.find((w) => w.name === BOX);
	if (!box) {
		box = ComfyWidgets.STRING(node, BOX, ["STRING", { multiline: true }], app).widget;
		box.serialize = false;
		if (box.inputEl) {
			box.inputEl.readOnly = true;
			box.inputEl.style.opacity = 0.85;
		}
	}
	box.value = lines.join("\n\n");
	const size = node.computeSize();
	node.setSize([Math.max(node.size[0], size[0], 360), Math.max(node.size[1], size[1], 160)]);
	app.graph.setDirtyCanvas(true, true);
}

function hideSocketWidgets(node) {
	for (const w of node.widgets || []) {
		if (w.options?.forceInput && w.type !== "converted-widget") {
			w.type = "converted-widget";
			w.computeSize = () => [0, -4];
			w.serializeValue = () => undefined; // the linked text is what runs
		}
	}
}

app.registerExtension({
	name: "IdentityAttention.ShowText",
	async beforeRegisterNodeDef(nodeType, nodeData) {
		if (nodeData.name !== NODE_ID) return;
		const onNodeCreated = nodeType.prototype.onNodeCreated;
		nodeType.prototype.onNodeCreated = function () {
			const r = onNodeCreated?.apply(this, arguments);
			hideSocketWidgets(this);
			return r;
		};
		const onExecuted = nodeType.prototype.onExecuted;
		nodeType.prototype.onExecuted = function (message) {
			onExecuted?.apply(this, arguments);
			if (message?.text) showText(this, message.text);
		};
		const onSerialize = nodeType.prototype.onSerialize;
		nodeType.prototype.onSerialize = function (data) {
			onSerialize?.apply(this, arguments);
			data.widgets_values = []; // the shown text is output, not a setting
		};
	},
});
