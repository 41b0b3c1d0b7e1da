"""pecker-kernels: fused saliency, exact global top-k and masked optimizer steps."""

from .backends.base import Selection, StepConfig
from .dispatch import available_backends
from .optim import SalientAdam, SalientAdamW, SalientSGD
from .saliency import SaliencyAccumulator
from .select import select, topk_mask
from .update import masked_update

__version__ = "0.1.0"

__all__ = [
    "SaliencyAccumulator",
    "SalientAdam",
    "SalientAdamW",
    "SalientSGD",
    "Selection",
    "StepConfig",
    "available_backends",
    "masked_update",
    "select",
    "topk_mask",
]
