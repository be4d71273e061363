"""Tests compare numerics in float64; float32 tests set their dtype explicitly."""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)
os.environ.setdefault("MPLBACKEND", "Agg")

settings.register_profile(
    "attnflow", deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors]
)
settings.load_profile("attnflow")


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)
