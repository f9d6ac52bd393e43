"""The pack's embedded diffusion models and quality score (16x16 MNIST digits; see ``model.py`` and ``train.py``).

``load_model("eps")``: Stable Diffusion v1 discrete schedule, eps prediction; ``load_model("flow")``: rectified flow,
velocity prediction; both k-diffusion denoisers ``D(x, sigma, cond=labels, cfg_scale=w)``.
``QualityScore()``: Fréchet distance and class confidence from a shipped digit classifier.
"""
from .model import IMAGE_SHAPE, MODEL_KINDS, NULL_LABEL, NUM_CLASSES, DiscreteVPSchedule, EmbeddedDenoiser, load_model
from .quality import QualityScore

__all__ = ["IMAGE_SHAPE", "MODEL_KINDS", "NULL_LABEL", "NUM_CLASSES", "DiscreteVPSchedule", "EmbeddedDenoiser",
           "load_model", "QualityScore"]
