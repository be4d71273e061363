"""TOML run configuration -> model, dynamics and simulate options. All validation lives here.

Every problem raises :class:`ConfigError` with one line that names the file, the key and what was
expected; the CLI prints it and exits with status 2.

Schema (later sections such as ``[stability]`` or ``[basins]`` are read by their own commands)::

    [model]
    d = 3
    heads = 1
    weights = "weights.npz"   # arrays Q, K, V: (heads, dh, d); O: (heads, d, dh), optional when heads = 1
    # or inline for one head: V = [[...], ...]; Q and K default to the identity
    beta = 1.0
    attention = "softmax"     # softmax | unnormalized | uniform | relu | sinkhorn
    mask = "full"             # full | causal | window:W
    [dynamics]
    time = "discrete"         # discrete | continuous
    alpha = 0.1               # discrete step size
    norm = "l2"               # l2 | layernorm | none (discrete); sphere | flat (continuous)
    tokens = 10
    steps = 2000              # discrete; continuous uses t1 (and dt, or solver = "adaptive")
    batch = 100
    init = "uniform"          # or a path to a .npy of shape (batch, tokens, d)
    dtype = "float32"         # float32 | float64
    seed = 0
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A problem with user input, reported as one line."""


_MODEL_KEYS = {"d", "heads", "weights", "V", "Q", "K", "O", "beta", "attention", "mask", "sinkhorn_iters", "relu_normalize"}
_DYN_KEYS = {"time", "alpha", "norm", "tokens", "steps", "t1", "dt", "solver", "saves", "tol", "batch", "init", "dtype", "seed", "rtol", "atol"}


def _num(where: str, value, *, positive=False, integer=False, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if integer and (not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{where} must be > 0, got {value!r}")
    return value


def _choice(where: str, value, options):
    if value not in options:
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


@dataclasses.dataclass
class RunConfig:
    """A validated run configuration. Build the model with :meth:`build`, the states with :meth:`initial`."""

    path: Path
    raw: dict[str, Any]
    d: int
    num_heads: int
    weights: dict[str, np.ndarray]
    beta: float
    attention: str
    mask: str
    window: int | None
    sinkhorn_iters: int
    relu_normalize: bool
    time: str
    alpha: float
    norm: str
    tokens: int
    steps: int | None
    t1: float | None
    dt: float | None
    solver: str
    saves: int | None
    tol: float | None
    rtol: float
    atol: float
    batch: int
    init: str
    dtype: str
    seed: int

    def section(self, name: str) -> dict[str, Any]:
        """A further TOML table, e.g. ``[stability]`` (empty dict if absent)."""
        sec = self.raw.get(name, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{self.path}: [{name}] must be a table")
        return sec

    def error(self, msg: str) -> ConfigError:
        """A ConfigError naming this config file."""
        return ConfigError(f"{self.path}: {msg}")

    @property
    def heads(self):
        from ..model.heads import Heads

        w = {k: np.asarray(v, dtype=self.dtype) for k, v in self.weights.items()}
        return Heads(**w)

    def attention_module(self):
        """The :class:`Attention` the config describes (kind, mask, options)."""
        from ..model.attention import Attention

        return Attention(self.attention, self.mask, self.window, self.sinkhorn_iters, self.relu_normalize)

    def build(self):
        """The configured dynamics (a :class:`LayerMap`, :class:`SphereFlow` or :class:`FlatFlow`)."""
        from ..model import FlatFlow, LayerMap, SelfAttention, SphereFlow, make_norm

        self._enable_dtype()
        attn = SelfAttention(self.heads, self.attention_module(), np.asarray(self.beta, dtype=self.dtype))
        if self.time == "discrete":
            return LayerMap(attn, np.asarray(self.alpha, dtype=self.dtype), make_norm(self.norm))
        return SphereFlow(attn) if self.norm == "sphere" else FlatFlow(attn)

    def _enable_dtype(self):
        if self.dtype == "float64":
            import jax

            jax.config.update("jax_enable_x64", True)

    def initial(self, key=None):
        """Initial states ``(batch, tokens, d)``: uniform on the sphere from ``seed``, or loaded from ``init``."""
        import jax

        from ..evolve import sample

        self._enable_dtype()
        if self.init == "uniform":
            key = jax.random.PRNGKey(self.seed) if key is None else key
            return sample.sphere(key, (self.batch, self.tokens, self.d), dtype=self.dtype)
        p = (self.path.parent / self.init) if not Path(self.init).is_absolute() else Path(self.init)
        if not p.exists():
            raise self.error(f"[dynamics] init file {str(p)!r} not found")
        try:
            x = np.load(p)
        except Exception as e:  # noqa: BLE001 - report any unreadable file as one line
            raise self.error(f"[dynamics] init file {str(p)!r} could not be read: {e}") from None
        want = (self.batch, self.tokens, self.d)
        if x.shape != want:
            raise self.error(f"[dynamics] init file {str(p)!r} has shape {x.shape}, expected (batch, tokens, d) = {want}")
        if not np.all(np.isfinite(x)):
            raise self.error(f"[dynamics] init file {str(p)!r} contains non-finite values")
        return jax.numpy.asarray(x, dtype=self.dtype)

    def simulate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`attnflow.simulate`."""
        from ..evolve.solvers import Adaptive, make_solver

        kw: dict[str, Any] = dict(saves=self.saves, tol=self.tol)
        if self.time == "discrete":
            kw["steps"] = self.steps
        else:
            kw["t1"] = self.t1
            if self.solver == "adaptive":
                kw["solver"] = Adaptive(rtol=self.rtol, atol=self.atol)
            else:
                kw["solver"] = make_solver(self.solver)
                kw["dt"] = self.dt
        return kw


def _load_weights(path: Path, model: dict, d: int, heads: int, dtype: str) -> dict[str, np.ndarray]:
    where = f"{path}: [model]"
    if "weights" in model:
        if any(k in model for k in ("V", "Q", "K", "O")):
            raise ConfigError(f"{where} give either weights = '...npz' or inline V/Q/K, not both")
        wp = Path(model["weights"])
        wp = wp if wp.is_absolute() else path.parent / wp
        if not wp.exists():
            raise ConfigError(f"{where} weights file {str(wp)!r} not found")
        try:
            with np.load(wp) as z:
                arrs = {k: np.asarray(z[k], dtype=float) for k in z.files}
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{where} weights file {str(wp)!r} could not be read: {e}") from None
        missing = [k for k in ("Q", "K", "V") if k not in arrs]
        if missing:
            raise ConfigError(f"{where} weights file {str(wp)!r} lacks arrays {', '.join(missing)} (has {', '.join(arrs) or 'none'})")
        Q, K, V = arrs["Q"], arrs["K"], arrs["V"]
        if Q.ndim != 3:
            raise ConfigError(f"{where} weights {wp.name}: Q must have shape (heads, dh, d), got {Q.shape}")
        dh = Q.shape[1]
        if "O" not in arrs:
            if heads != 1 or dh != d:
                raise ConfigError(f"{where} weights {wp.name}: O (heads, d, dh) is required unless heads = 1 and dh = d")
            arrs["O"] = np.eye(d)[None]
        O = arrs["O"]
        want = {"Q": (heads, dh, d), "K": (heads, dh, d), "V": (heads, dh, d), "O": (heads, d, dh)}
        for name, shape in want.items():
            if arrs[name].shape != shape:
                raise ConfigError(f"{where} weights {wp.name}: {name} must have shape {shape} (heads={heads}, dh={dh}, d={d}), got {arrs[name].shape}")
        out = {"Q": Q, "K": K, "V": V, "O": O}
    else:
        if heads != 1:
            raise ConfigError(f"{where} inline weights (V = [[...]]) are for heads = 1; use weights = 'file.npz' for {heads} heads")
        if "V" not in model:
            raise ConfigError(f"{where} needs weights = 'file.npz' or an inline V = [[...], ...]")
        mats = {}
        for name in ("V", "Q", "K"):
            if name not in model:
                mats[name] = np.eye(d)
                continue
            try:
                m = np.asarray(model[name], dtype=float)
            except (ValueError, TypeError):
                raise ConfigError(f"{where} {name} must be a numeric matrix of shape ({d}, {d})") from None
            if m.shape != (d, d):
                raise ConfigError(f"{where} {name} must have shape ({d}, {d}), got {m.shape}")
            mats[name] = m
        out = {"Q": mats["Q"][None], "K": mats["K"][None], "V": mats["V"][None], "O": np.eye(d)[None]}
    for name, a in out.items():
        if not np.all(np.isfinite(a)):
            raise ConfigError(f"{where} weight {name} contains non-finite values")
    return out


def parse_config(raw: dict, path: str | Path = "<config>") -> RunConfig:
    """Validate a TOML dictionary (see the module docstring for the schema)."""
    from ..model.attention import KINDS, parse_mask

    path = Path(path)
    model = raw.get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"{path}: missing [model] table")
    dyn = raw.get("dynamics", {})
    if not isinstance(dyn, dict):
        raise ConfigError(f"{path}: [dynamics] must be a table")
    for table, keys, name in ((model, _MODEL_KEYS, "model"), (dyn, _DYN_KEYS, "dynamics")):
        unknown = sorted(set(table) - keys)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) in [{name}]: {', '.join(unknown)} (allowed: {', '.join(sorted(keys))})")
    m = f"{path}: [model]"
    dy = f"{path}: [dynamics]"
    d = _num(f"{m} d", model.get("d"), positive=True, integer=True)
    heads = _num(f"{m} heads", model.get("heads", 1), positive=True, integer=True)
    beta = _num(f"{m} beta", model.get("beta", 1.0), positive=True)
    attention = _choice(f"{m} attention", model.get("attention", "softmax"), KINDS)
    try:
        mask, window = parse_mask(model.get("mask", "full"))
    except ValueError as e:
        raise ConfigError(f"{m} {e}") from None
    sinkhorn_iters = _num(f"{m} sinkhorn_iters", model.get("sinkhorn_iters", 3), positive=True, integer=True)
    relu_normalize = bool(model.get("relu_normalize", False))
    dtype = _choice(f"{dy} dtype", dyn.get("dtype", "float32"), ("float32", "float64"))
    weights = _load_weights(path, model, d, heads, dtype)
    time = _choice(f"{dy} time", dyn.get("time", "discrete"), ("discrete", "continuous"))
    if time == "discrete":
        norm = _choice(f"{dy} norm", dyn.get("norm", "l2"), ("l2", "layernorm", "none"))
        steps = _num(f"{dy} steps", dyn.get("steps", 1000), positive=True, integer=True)
        solver = "iterate"
        t1 = dt = None
    else:
        norm = _choice(f"{dy} norm", dyn.get("norm", "sphere"), ("sphere", "flat"))
        solver = _choice(f"{dy} solver", dyn.get("solver", "rk4"), ("rk4", "euler", "adaptive"))
        t1 = float(_num(f"{dy} t1", dyn.get("t1", 10.0), positive=True))
        dt = None if solver == "adaptive" else float(_num(f"{dy} dt", dyn.get("dt", 0.01), positive=True))
        steps = None
        if dt is not None:
            k = round(t1 / dt)
            if abs(k * dt - t1) > 1e-9 * max(1.0, t1):
                raise ConfigError(f"{dy} t1 = {t1} must be a whole number of steps dt = {dt}")
    saves = _num(f"{dy} saves", dyn.get("saves"), positive=True, integer=True, allow_none=True)
    total = steps if time == "discrete" else (None if dt is None else round(t1 / dt))
    if saves is not None and total is not None and total % saves:
        raise ConfigError(f"{dy} saves = {saves} must divide the number of steps ({total})")
    tol = _num(f"{dy} tol", dyn.get("tol"), positive=True, allow_none=True)
    init = dyn.get("init", "uniform")
    if not isinstance(init, str):
        raise ConfigError(f"{dy} init must be 'uniform' or a path to a .npy file, got {init!r}")
    return RunConfig(
        path=path,
        raw=raw,
        d=d,
        num_heads=heads,
        weights=weights,
        beta=float(beta),
        attention=attention,
        mask=mask,
        window=window,
        sinkhorn_iters=sinkhorn_iters,
        relu_normalize=relu_normalize,
        time=time,
        alpha=float(_num(f"{dy} alpha", dyn.get("alpha", 0.1), positive=True)),
        norm=norm,
        tokens=_num(f"{dy} tokens", dyn.get("tokens", 10), positive=True, integer=True),
        steps=steps,
        t1=t1,
        dt=dt,
        solver=solver,
        saves=saves,
        tol=None if tol is None else float(tol),
        rtol=float(_num(f"{dy} rtol", dyn.get("rtol", 1e-6), positive=True)),
        atol=float(_num(f"{dy} atol", dyn.get("atol", 1e-8), positive=True)),
        batch=_num(f"{dy} batch", dyn.get("batch", 100), positive=True, integer=True),
        init=init,
        dtype=dtype,
        seed=_num(f"{dy} seed", dyn.get("seed", 0), integer=True),
    )


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML run configuration."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} not found")
    if path.is_dir():
        raise ConfigError(f"config path {str(path)!r} is a directory, expected a .toml file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    return parse_config(raw, path)
