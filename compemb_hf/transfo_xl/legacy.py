"""The transformers 4.x model type ``"transfo-xl"``, for checkpoints of the removed
``TransfoXLLMHeadModel`` (the public WikiText-103 one among them).

transformers 5 no longer knows ``model_type="transfo-xl"``; registering this config
under it lets ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM.from_pretrained``
open such a checkpoint with this package's classes (the state_dict layout is the same).
Saving such a model again keeps ``"transfo-xl"``.
"""
from __future__ import annotations

from . import configuration


class TransfoXLConfig(configuration.TransfoXLConfig):
    # the same class name as the model classes' config_class: transformers' Auto
    # registration compares the names
    model_type = "transfo-xl"


TransfoXLConfig.__qualname__ = "TransfoXLConfig"
TransfoXL4xConfig = TransfoXLConfig

__all__ = ["TransfoXL4xConfig"]
