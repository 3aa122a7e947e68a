"""FEAT as an attention method for pretrained video DiTs (an experimental baseline; needs distillation)."""

from .method import FEATConfig, FEATLayer, FEATMethod

__all__ = ["FEATConfig", "FEATLayer", "FEATMethod"]
