"""Tests compare numerics in float64; float32 tests set their dtype explicitly."""

import os
import tempfile

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)
os.environ.setdefault("MPLBACKEND", "Agg")
# the CLI keeps compiled programs in $XDG_CACHE_HOME/attnflow/jax: tests (and the commands they start) use a cache of
# their own, never the user's
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="attnflow-test-cache-")

# CI must not go red on a draw it has never seen: the default profile is derandomized (the same examples every
# run). ATTNFLOW_HYPOTHESIS=explore draws fresh examples, for hunting counter-examples locally.
_common = dict(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
settings.register_profile("attnflow", derandomize=True, **_common)
settings.register_profile("explore", **_common)
settings.load_profile("explore" if os.environ.get("ATTNFLOW_HYPOTHESIS") == "explore" else "attnflow")


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@pytest.fixture
def no_compute(monkeypatch):
    """Make every simulation and study fail loudly: a refusal must come before any work."""
    import attnflow as af
    import attnflow.analysis.basins as bs

    def boom(*a, **k):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(af, "simulate", boom)
    monkeypatch.setattr(bs, "basin_fractions", boom)
    return boom
