// ComfyUI frontend extension of dpm-solver-nodes (served from WEB_DIRECTORY; the WebUI never loads it).
// A new "DPM-Solver-v3 EMS compute" node starts with its seed's "control after generate" at "fixed": the seed is part
// of the EMS cache key, and the frontend's default for seeds, "randomize", would recompute the EMS on every queued
// run. Loaded workflows keep their stored value (widgets_values are applied after nodeCreated).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "dpm_solver_nodes.emsSeedFixed",
  nodeCreated(node) {
    if (node.comfyClass !== "DPMSolverNodes_ComputeEMS") return;
    const control = node.widgets?.find((widget) => widget.name === "control_after_generate");
    if (control) control.value = "fixed";
  },
});
