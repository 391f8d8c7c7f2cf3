"""Fixtures shared by the test modules; graph-building helpers live in builders.py."""
import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
