"""tuner: personalize latent diffusion models (LoRA/LoCon, DreamBooth, textual inversion).

The distribution is published as ``tuner-diffusion``; the import name and the command are ``tuner``.
"""

__version__ = "0.1.0"
