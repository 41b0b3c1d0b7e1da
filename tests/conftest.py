"""Test set-up: without a GPU, Triton kernels run under the interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is imported (pecker_kernels.backends.triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
