// ComfyUI frontend extension of dpm-solver-nodes (served from WEB_DIRECTORY; the WebUI never loads it).
// 1. A new "DPM-Solver-v3 EMS compute" node starts with its seed's "control after generate" at "fixed": the seed is
//    part of the EMS cache key, and the frontend's default for seeds, "randomize", would recompute the EMS on every
//    queued run. Loaded workflows keep their stored value (widgets_values are applied after nodeCreated).
// 2. The node shows its outcome (the text of its "summary" output: where the EMS come from, what they cost, which
//    solver DPM-Solver-v3 runs at which step count) in a read-only box under its widgets, as the core "Preview Any"
//    node shows its input. The box is not saved with the workflow and not sent with the prompt. While the node runs,
//    the phase and the time left appear in ComfyUI's own progress text on the node (sent by the server).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const EMS_NODE = "DPMSolverNodes_ComputeEMS";
const OUTCOME = "ems_outcome";

app.registerExtension({
  name: "dpm_solver_nodes.emsSeedFixed",
  nodeCreated(node) {
    if (node.comfyClass !== EMS_NODE) return;
    const control = node.widgets?.find((widget) => widget.name === "control_after_generate");
    if (control) control.value = "fixed";
  },
});

app.registerExtension({
  name: "dpm_solver_nodes.emsOutcome",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== EMS_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const widget = ComfyWidgets["STRING"](this, OUTCOME, ["STRING", { multiline: true }], app).widget;
      widget.element.readOnly = true;
      widget.element.placeholder = "outcome: shown after the node has run";
      widget.serialize = false;
      widget.options = { ...(widget.options ?? {}), serialize: false };
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.[0];
      const widget = this.widgets?.find((w) => w.name === OUTCOME);
      if (widget && typeof text === "string") widget.value = text;
    };
  },
});
