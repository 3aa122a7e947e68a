"""FEAT as an attention method for pretrained video DiTs: an experimental baseline (needs distillation, and even
then stays far from the stock output; see :mod:`.method`)."""

from .method import FEATConfig, FEATLayer, FEATMethod

__all__ = ["FEATConfig", "FEATLayer", "FEATMethod"]
