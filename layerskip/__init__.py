"""layerskip: train small language models with LayerSkip, then decode faster by skipping layers."""

__version__ = "0.1.0"
