"""Fixtures for the recipe tests: one torch thread (tiny networks; the machine is shared), restored after."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
