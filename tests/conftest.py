"""Shared fixtures: the device list and markers (``cuda``, ``triton``, ``ext``)."""
from __future__ import annotations

import os

import pytest
import torch

from datta_kernels import _ext

HAS_CUDA = torch.cuda.is_available()
HAS_EXT = not _ext.unavailable_reasons()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: devices every test that takes ``device`` runs on
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device")
    skip_ext = pytest.mark.skip(reason="datta_kernels._C not built: " + "; ".join(_ext.unavailable_reasons()))
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "ext" in item.keywords and not HAS_EXT:
            item.add_marker(skip_ext)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
