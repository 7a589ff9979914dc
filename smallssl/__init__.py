"""smallssl: self-supervised contrastive training, distillation and evaluation of small vision models."""

__version__ = "0.1.0"
