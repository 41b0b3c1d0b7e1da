"""pecker-kernels: fused saliency, exact global top-k and masked optimizer steps."""

__version__ = "0.1.0"
