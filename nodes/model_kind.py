"""Which ``model_kind`` ("eps" or "flow") a ComfyUI model is, read from its ``model_sampling`` object.

ComfyUI mixes a parameterization class (EPS, V_PREDICTION, EDM, X0, CONST, ...) into every model_sampling object
(docs/hosts.md 1.4).  The test is ``isinstance`` against those classes, most specific first, never ``model_type``:
an SD1.5 checkpoint patched with ModelSamplingSD3 samples as CONST (flow) although its config says EPS.

  CONST                      -> "flow"  (x = (1 - sigma) x0 + sigma n)
  V_PREDICTION, EDM, X0, EPS -> "eps"   (x = x0 + sigma n; the host converts every output to the denoised x0)

Anything else (e.g. Cosmos' COSMOS_RFLOW, whose sigma is not the noise level of x) is refused with a ValueError.
"""
from __future__ import annotations

# (class name in comfy.model_sampling, model_kind), most specific first: V_PREDICTION, EDM and X0 subclass EPS.
KIND_BY_CLASS = (
    ("CONST", "flow"),
    ("EDM", "eps"),
    ("V_PREDICTION", "eps"),
    ("X0", "eps"),
    ("EPS", "eps"),
)


def _comfy_parameterizations():
    import comfy.model_sampling

    return comfy.model_sampling


def detect_model_kind(model_sampling, parameterizations=None) -> str:
    """"eps" or "flow" for a ComfyUI ``model_sampling`` object; ValueError for a parameterization we cannot sample.

    ``parameterizations`` is the module (or any object) holding the classes named in ``KIND_BY_CLASS``; it defaults
    to ``comfy.model_sampling``.
    """
    if model_sampling is None:
        raise ValueError("the model has no model_sampling object; cannot tell its noise parameterization")
    module = parameterizations if parameterizations is not None else _comfy_parameterizations()
    for class_name, kind in KIND_BY_CLASS:
        cls = getattr(module, class_name, None)
        if cls is not None and isinstance(model_sampling, cls):
            return kind
    bases = ", ".join(c.__name__ for c in type(model_sampling).__mro__[1:-1]) or "none"
    raise ValueError(
        f"dpm_solver_nodes cannot sample a model whose model_sampling is {type(model_sampling).__name__} "
        f"(bases: {bases}): only EPS, V_PREDICTION, EDM, X0 (sampled as 'eps') and CONST flow models "
        f"(sampled as 'flow') are supported")


def find_attribute(model, name, depth=6):
    """Follow the ``.inner_model`` chain of a sampler's ``model`` argument (KSamplerX0Inpaint -> CFGGuider ->
    BaseModel) and return the first object's ``name`` attribute, or None."""
    current = model
    for _ in range(depth):
        if current is None:
            return None
        value = getattr(current, name, None)
        if value is not None:
            return value
        current = getattr(current, "inner_model", None)
    return None


def model_kind_of_sampler_model(model, parameterizations=None) -> str:
    """The model kind of the ``model`` a sampler function receives from ComfyUI's KSAMPLER."""
    return detect_model_kind(find_attribute(model, "model_sampling"), parameterizations)


__all__ = ["KIND_BY_CLASS", "detect_model_kind", "find_attribute", "model_kind_of_sampler_model"]
