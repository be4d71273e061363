"""TOML run configuration -> model, dynamics and command options. One declarative schema; all validation here.

The schema is a set of typed records (dataclasses below, one per TOML table); :func:`reference` renders it as
the documented TOML, and the ``--help`` texts of the commands list their tables' keys from it. Every problem
raises :class:`ConfigError` with one line that names the file, the table, the key and what was expected; the
CLI prints it and exits with status 2. Unknown tables and keys are refused with a "did you mean". Types are
strict (no ``"false"`` for a bool, no ``10.7`` or ``true`` for an integer), ranges are checked, and a number
that does not fit the chosen dtype is refused at load.

Loading has no side effects: nothing here switches JAX to float64. A ``dtype = "float64"`` config needs
``jax.config.update("jax_enable_x64", True)`` before :meth:`RunConfig.build` (the ``attnflow`` command line
does this at its edge, in ``attnflow.cli._common.load_run_config``).

Input files (weights, init, states) are read once, at load, and their SHA-256 hashes are kept in
:attr:`RunConfig.inputs`, so that a run directory can record its inputs by content.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import math
import sys
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..model.attention import KINDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A problem with user input, reported as one line."""


SEED_MAX = 2**32 - 1  # jax.random.PRNGKey(seed) is injective on [0, 2^32); larger seeds would collide
STEPS_MAX = 2**31 - 1  # step counters are int32
Matrix = list  # a TOML array of arrays of numbers (annotation marker)


def key(default=MISSING, *, doc: str, choices=None, ge=None, gt=None, le=None, lt=None, example=None, checked_by=None):
    """A schema entry: a dataclass field whose metadata carries its documentation and its constraints.

    `checked_by` names the model constructor that already validates the value (its `choices` are then
    documentation only: the check is not repeated here)."""
    meta = dict(doc=doc, choices=choices, ge=ge, gt=gt, le=le, lt=lt, example=example, checked_by=checked_by)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------- the schema
@dataclass(frozen=True)
class ModelTable:
    """[model]: the attention layer."""

    d: int = key(doc="dimension of the token space", ge=1, example=3)
    heads: int = key(1, doc="number of attention heads", ge=1)
    weights: Union[str, None] = key(None, doc="path of an .npz with Q, K, V (heads, dh, d) and O (heads, d, dh), O optional when heads = 1; optional biases bq, bk, bv (heads, dh), bo (d,)", example="w.npz")
    V: Union[Matrix, None] = key(None, doc="inline (d, d) value matrix, one head (instead of weights)")
    Q: Union[Matrix, None] = key(None, doc="inline (d, d) query matrix, one head (default identity)")
    K: Union[Matrix, None] = key(None, doc="inline (d, d) key matrix, one head (default identity)")
    O: Union[Matrix, None] = key(None, doc="inline (d, d) output matrix, one head (default identity)")
    beta: float = key(1.0, doc="inverse temperature (> 0)")
    attention: str = key("softmax", doc="attention kind", choices=KINDS, checked_by="Attention")
    mask: str = key("full", doc="full | causal | window:W")
    sinkhorn_iters: int = key(3, doc="Sinkhorn iterations (attention = 'sinkhorn')")
    relu_normalize: bool = key(False, doc="normalise relu attention rows to sum 1")


@dataclass(frozen=True)
class DynamicsTable:
    """[dynamics]: the evolution and the ensemble."""

    time: str = key("discrete", doc="discrete layer map or continuous flow", choices=("discrete", "continuous"))
    alpha: float = key(0.1, doc="step size of the discrete map (> 0)")
    norm: Union[str, None] = key(None, doc="l2 | layernorm | none (discrete, default l2); sphere | flat (continuous, default sphere)")
    tokens: int = key(10, doc="tokens n per configuration", ge=1)
    steps: int = key(1000, doc="steps of the discrete map", ge=1, le=STEPS_MAX)
    t1: float = key(10.0, doc="end time of the continuous flow", gt=0)
    dt: float = key(0.01, doc="fixed step of the continuous flow (t1 a whole number of steps)", gt=0)
    solver: str = key("rk4", doc="continuous solver", choices=("rk4", "euler", "adaptive"))
    rtol: float = key(1e-6, doc="relative tolerance (solver = 'adaptive')", gt=0)
    atol: float = key(1e-8, doc="absolute tolerance (solver = 'adaptive')", gt=0)
    saves: Union[int, None] = key(None, doc="save the trajectory at this many equally spaced points", ge=1)
    tol: Union[float, None] = key(None, doc="stop each member once its per-step change is below tol", gt=0)
    batch: int = key(100, doc="ensemble members", ge=1)
    init: str = key("uniform", doc="'uniform' on the sphere, or a .npy of shape (batch, tokens, d)")
    dtype: str = key("float32", doc="floating dtype", choices=("float32", "float64"))
    seed: int = key(0, doc="PRNG seed", ge=0, le=SEED_MAX)
    backend: str = key("auto", doc="computing path of attnflow.simulate", choices=("auto", "xla", "lanes", "fused"))


@dataclass(frozen=True)
class SamplerTable:
    """[basins] sampler = {...}: initial states near an equilibrium."""

    around: str = key("consensus", doc="equilibrium to sample around", choices=("consensus", "bipartite"))
    eigenvector: int = key(0, doc="index of the real eigenvector of W", ge=0)
    split: int = key(0, doc="bipartite split m (1 <= m < tokens); 0 for consensus", ge=0)
    radius: float = key(0.1, doc="perturbation radius", gt=0)


@dataclass(frozen=True)
class BasinsContinuationTable:
    """[basins] continuation = {...}: basin fractions along a parameter."""

    param: str = key(doc="parameter to sweep", choices=("beta", "alpha"), example="beta")
    values: list[float] = key(doc="values of the parameter (each > 0)", gt=0, example=[0.5, 1.0, 2.0])


@dataclass(frozen=True)
class LocalTable:
    """[basins] local = {...}: local basin radius of an equilibrium."""

    eigenvector: int = key(0, doc="index of the real eigenvector of W", ge=0)
    split: int = key(0, doc="bipartite split m; 0 for consensus", ge=0)
    q: float = key(0.9, doc="fraction of perturbations that must return", gt=0, lt=1)
    samples: int = key(128, doc="perturbations per radius", ge=1)


@dataclass(frozen=True)
class BasinsTable:
    """[basins]: Monte Carlo basin fractions (``attnflow basins``)."""

    samples: int = key(1000, doc="initial states", ge=1)
    seed: Union[int, None] = key(None, doc="PRNG seed (default [dynamics] seed)", ge=0, le=SEED_MAX)
    chunk_size: Union[int, None] = key(None, doc="states per chunk (default min(samples, 10000)); part of the run's identity", ge=1)
    tol: Union[float, None] = key(None, doc="convergence tolerance (default [dynamics] tol or 1e-7)", gt=0)
    cluster_tol: float = key(1e-3, doc="classifier tolerance", gt=0)
    ci_width: Union[float, None] = key(None, doc="adaptive: add chunks until every 95% interval is narrower", gt=0, lt=1)
    max_steps: Union[int, None] = key(None, doc="hard cap of steps per member; members still moving there are 'not converged' (default max(10 x [dynamics] steps or t1/dt, 10000))", ge=1, le=STEPS_MAX)
    round_steps: Union[int, None] = key(None, doc="steps between two retire-and-refill passes of the member pool (default 8; 40 per round of simulate for adaptive solves); speed only", ge=1)
    pool_size: Union[int, None] = key(None, doc="member slots advanced together (default min(512, samples) on the lanes backend, else min(16384, samples, max(chunk_size, 64))); speed only", ge=1)
    sampler: Union[str, SamplerTable] = key("uniform", doc="'uniform', or a table {around, eigenvector, split, radius}", choices=("uniform",))
    continuation: Union[BasinsContinuationTable, None] = key(None, doc="{param = 'beta' | 'alpha', values = [...]}")
    local: Union[LocalTable, None] = key(None, doc="{eigenvector, split, q, samples}")


@dataclass(frozen=True)
class ClusteringTable:
    """[stability] clustering = {...}: a search for equilibria not aligned with an eigenvector."""

    starts: int = key(64, doc="random starts", ge=1)
    clusters: int = key(2, doc="clusters per start", ge=1)


@dataclass(frozen=True)
class StabilityContinuationTable:
    """[stability] continuation = {...}: follow one equilibrium along a parameter."""

    start: float = key(doc="first value (> 0)", gt=0, example=0.5)
    stop: float = key(doc="last value (> 0)", gt=0, example=2.0)
    param: str = key("beta", doc="parameter", choices=("beta", "alpha"))
    num: int = key(20, doc="number of values", ge=1)
    eigenvector: int = key(0, doc="index of the real eigenvector of W", ge=0)
    split: int = key(0, doc="bipartite split m; 0 for consensus", ge=0)


@dataclass(frozen=True)
class StabilityTable:
    """[stability]: equilibria and their stability (``attnflow stability``)."""

    states: Union[str, None] = key(None, doc="a .npy of states (k, tokens, d) or (tokens, d), refined first")
    clustering: Union[ClusteringTable, None] = key(None, doc="{starts, clusters}")
    continuation: Union[StabilityContinuationTable, None] = key(None, doc="{param, start, stop, num, eigenvector, split}")
    tol: float = key(1e-8, doc="tolerance of the stability verdict", gt=0)


@dataclass(frozen=True)
class EnergyTable:
    """[energy]: energies and monotonicity (``attnflow energy``)."""

    tol: Union[float, None] = key(None, doc="relative tolerance of 'non-decreasing' (default 1e-10 float64, 1e-5 float32)", gt=0)
    members: int = key(16, doc="ensemble members traced (the JSON reports member 0)", ge=1)
    eps: float = key(1e-3, doc="T_eps(beta) figure: cluster threshold rho >= 1 - eps", gt=0, lt=1)
    rho0: float = key(0.0, doc="equiangular start of the T_eps(beta) figure", gt=-1, lt=1)
    points: int = key(60, doc="number of beta values of the figure", ge=2)
    beta_max: Union[float, None] = key(None, doc="largest beta of the figure (default 4 beta_c)", gt=0)
    w: Union[list[float], None] = key(None, doc="scalar heads w_h (with m; default tr(W_h)/d)")
    m: Union[list[float], None] = key(None, doc="scalar heads m_h (with w; default tr(M_h)/d)")


@dataclass(frozen=True)
class ConfigFile:
    """The whole TOML file: one record per table."""

    model: ModelTable = key(doc="the attention layer")
    dynamics: DynamicsTable = key(DynamicsTable(), doc="the evolution and the ensemble")
    basins: BasinsTable = key(BasinsTable(), doc="attnflow basins")
    stability: StabilityTable = key(StabilityTable(), doc="attnflow stability")
    energy: EnergyTable = key(EnergyTable(), doc="attnflow energy")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


TABLES: dict[str, type] = dict(_hints(ConfigFile))  # table name -> record type


# ------------------------------------------------------------------------------------------- the parser
def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(sorted(options))})"


def _range(where: str, v, meta) -> None:
    tests = {"ge": (">=", lambda a, b: a >= b), "gt": (">", lambda a, b: a > b),
             "le": ("<=", lambda a, b: a <= b), "lt": ("<", lambda a, b: a < b)}
    lims = [(op, fn, meta[k]) for k, (op, fn) in tests.items() if meta.get(k) is not None]
    if not all(fn(v, lim) for _, fn, lim in lims):
        ops = [op for op, _, _ in lims]
        if len(lims) == 2 and ops[0] in (">", ">=") and ops[1] in ("<", "<="):
            lo, hi = "(" if ops[0] == ">" else "[", ")" if ops[1] == "<" else "]"
            raise ConfigError(f"{where} must lie in {lo}{lims[0][2]}, {lims[1][2]}{hi}, got {v!r}")
        raise ConfigError(f"{where} must be {' and '.join(f'{op} {lim}' for op, _, lim in lims)}, got {v!r}")


def _typename(tp) -> str:
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _value(where: str, v, tp, meta):
    """Check one TOML value against an annotation; returns the typed value."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _value(where, v, args[0], meta)
        # str | Table: a named choice or an inline table
        for a in args:
            if a is str and isinstance(v, str):
                return _value(where, v, str, meta)
            if dataclasses.is_dataclass(a) and isinstance(v, dict):
                return parse_table(a, v, where)
        raise ConfigError(f"{where} must be {' or '.join(_typename(a) for a in args)}, got {v!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise ConfigError(f"{where} must be a table, got {v!r}")
        return parse_table(tp, v, where)
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where} must be true or false (without quotes), got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where} must be an integer, got {v!r}")
        _range(where, v, meta)
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where} must be a number, got {v!r}")
        try:
            v = float(v)
        except OverflowError:
            raise ConfigError(f"{where} is too large, got {v!r}") from None
        if not math.isfinite(v):
            raise ConfigError(f"{where} must be finite, got {v!r}")
        _range(where, v, meta)
        return v
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where} must be a string, got {v!r}")
        if meta.get("choices") and not meta.get("checked_by") and v not in meta["choices"]:
            hint = difflib.get_close_matches(v, meta["choices"], n=1, cutoff=0.6)
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, meta['choices']))}, got {v!r}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return v
    if tp is Matrix:
        if not isinstance(v, list) or not v or not all(isinstance(r, list) for r in v):
            raise ConfigError(f"{where} must be a matrix (an array of arrays of numbers), got {v!r}")
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for r in v for x in r):
            raise ConfigError(f"{where} must hold numbers only")
        if len({len(r) for r in v}) != 1:
            raise ConfigError(f"{where} must be rectangular (rows of equal length)")
        return tuple(tuple(float(x) for x in r) for r in v)
    if origin is list:
        (elem,) = typing.get_args(tp)
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{where} must be a non-empty array, got {v!r}")
        return tuple(_value(f"{where}[{i}]", x, elem, meta) for i, x in enumerate(v))
    raise TypeError(f"unsupported schema type {tp!r}")  # pragma: no cover - a schema bug, not user input


def parse_table(cls, raw, where: str):
    """Check a TOML table against the record type ``cls``: unknown keys, missing keys, types and ranges."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table, got {raw!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            raise ConfigError(f"{where} has an unknown key {k!r}{_did_you_mean(k, names)}")
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kw[f.name] = _value(f"{where} {f.name}", raw[f.name], hints[f.name], f.metadata)
        elif f.default is MISSING:
            raise ConfigError(f"{where} needs {f.name} ({f.metadata['doc']})")
    return cls(**kw)


# --------------------------------------------------------------------------------------- documentation
def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if dataclasses.is_dataclass(v):
        return "{" + ", ".join(f"{f.name} = {_fmt(getattr(v, f.name))}" for f in dataclasses.fields(v)) + "}"
    return repr(v)


def keys_of(table: str) -> list[str]:
    """The keys of a top-level table, in schema order."""
    return [f.name for f in dataclasses.fields(TABLES[table])]


def describe(table: str) -> str:
    """One paragraph listing a table's keys, their defaults and meanings (used by ``--help``)."""
    parts = []
    for f in dataclasses.fields(TABLES[table]):
        default = "" if f.default is MISSING or f.default is None else f" = {_fmt(f.default)}"
        choices = f.metadata.get("choices")
        tp = _hints(TABLES[table])[f.name]
        sub = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or ([tp] if dataclasses.is_dataclass(tp) else [])
        inner = f" {{{', '.join(g.name for g in dataclasses.fields(sub[0]))}}}" if sub else ""
        ch = f" ({' | '.join(choices)})" if choices and not sub else ""
        parts.append(f"{f.name}{default}{ch}{inner}")
    return f"[{table}] keys: " + "; ".join(parts) + "."


def reference() -> str:
    """The whole schema as a commented TOML document (every table, key, default and meaning)."""
    lines = []
    for table, cls in TABLES.items():
        lines.append(f"[{table}]")
        for f in dataclasses.fields(cls):
            v = f.metadata.get("example") if f.default is MISSING else f.default
            shown = f"{f.name} = {_fmt(v)}" if v is not None else f"# {f.name} ="
            choices = f.metadata.get("choices")
            rng = [f"{op} {f.metadata[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                   if f.metadata.get(k) is not None]
            lines.append(f"{shown:40s} # {f.metadata['doc']}" + (f" ({' | '.join(choices)})" if choices else "")
                         + (f" [{', '.join(rng)}]" if rng else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- input files
def _resolve(base: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else base.parent / q


def _read_bytes(where: str, p: Path) -> bytes:
    if not p.exists():
        raise ConfigError(f"{where} file {str(p)!r} not found")
    if p.is_dir():
        raise ConfigError(f"{where} {str(p)!r} is a directory, expected a file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where} file {str(p)!r} could not be read: {e.strerror or e}") from None


def _real_array(where: str, a: np.ndarray) -> np.ndarray:
    if np.iscomplexobj(a):
        raise ConfigError(f"{where} is complex ({a.dtype}); attnflow needs real numbers")
    if a.dtype.kind not in "fiu":
        raise ConfigError(f"{where} has dtype {a.dtype}, expected real numbers")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"{where} contains non-finite values")
    return a


def _check_fits(where: str, a, dtype: str) -> None:
    """Refuse numbers that overflow (or underflow to zero in) the chosen dtype."""
    fi = np.finfo(dtype)
    a = np.abs(np.asarray(a, dtype=np.float64))
    if a.size and a.max() > fi.max:
        raise ConfigError(f"{where} has magnitude {a.max():.3g}, which overflows {dtype} (max {float(fi.max):.3g})")
    tiny = a[(a > 0) & (a < fi.tiny)]
    if tiny.size:
        raise ConfigError(f"{where} has magnitude {tiny.min():.3g}, which underflows {dtype} (smallest normal {float(fi.tiny):.3g})")


def load_npy(where: str, p: Path) -> tuple[np.ndarray, str]:
    """A real, finite .npy array (never unpickled) and the SHA-256 of the file; one-line errors."""
    data = _read_bytes(where, p)
    if data[:2] == b"PK":
        raise ConfigError(f"{where} file {str(p)!r} is an .npz archive; expected a .npy array (numpy.save)")
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise ConfigError(f"{where} file {str(p)!r} is not a readable .npy array: {_one_line(e)}") from None
    if not isinstance(a, np.ndarray):
        raise ConfigError(f"{where} file {str(p)!r} is not a .npy array")
    return _real_array(f"{where} file {str(p)!r}", a), hashlib.sha256(data).hexdigest()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


# -------------------------------------------------------------------------------------------- the config
@dataclass
class RunConfig:
    """A validated run configuration. Build the model with :meth:`build`, the states with :meth:`initial`.

    The typed tables are :attr:`model`, :attr:`dynamics`, :attr:`basins`, :attr:`stability` and :attr:`energy`;
    the flat attributes (``d``, ``beta``, ``tokens``, ...) are kept for convenience.
    """

    path: Path
    raw: dict[str, Any]
    file: ConfigFile
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
    backend: str = "auto"
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    init_array: np.ndarray | None = None
    states_array: np.ndarray | None = None

    @property
    def model(self) -> ModelTable:
        """The ``[model]`` table."""
        return self.file.model

    @property
    def dynamics(self) -> DynamicsTable:
        """The ``[dynamics]`` table."""
        return self.file.dynamics

    @property
    def basins(self) -> BasinsTable:
        """The ``[basins]`` table."""
        return self.file.basins

    @property
    def stability(self) -> StabilityTable:
        """The ``[stability]`` table."""
        return self.file.stability

    @property
    def energy(self) -> EnergyTable:
        """The ``[energy]`` table."""
        return self.file.energy

    def section(self, name: str) -> dict[str, Any]:
        """A further TOML table as the raw dict (already validated at load; empty if absent)."""
        return self.raw.get(name, {})

    def error(self, msg: str) -> ConfigError:
        """A ConfigError naming this config file."""
        return ConfigError(f"{self.path}: {msg}")

    def _need_dtype(self):
        if self.dtype == "float64":
            import jax

            if not jax.config.read("jax_enable_x64"):
                raise self.error("[dynamics] dtype = 'float64' needs jax.config.update('jax_enable_x64', True) first "
                                 "(the attnflow command does this for you)")

    @property
    def heads(self):
        """The model's :class:`~attnflow.model.Heads`, built from the ``[model]`` table."""
        from ..model.heads import Heads

        w = {k: np.asarray(v, dtype=self.dtype) for k, v in self.weights.items()}
        return Heads(**w)

    def attention_module(self):
        """The :class:`Attention` the config describes (kind, mask, options)."""
        from ..model.attention import Attention

        return Attention(self.attention, self.mask, self.window, self.sinkhorn_iters, self.relu_normalize)

    def build(self):
        """The configured dynamics (a :class:`LayerMap`, :class:`SphereFlow` or :class:`FlatFlow`)."""
        self._need_dtype()
        return self._build()

    def _build(self):
        from ..model import FlatFlow, LayerMap, SelfAttention, SphereFlow, make_norm

        attn = SelfAttention(self.heads, self.attention_module(), np.asarray(self.beta, dtype=self.dtype))
        if self.time == "discrete":
            return LayerMap(attn, np.asarray(self.alpha, dtype=self.dtype), make_norm(self.norm))
        return SphereFlow(attn) if self.norm == "sphere" else FlatFlow(attn)

    def key(self):
        """The PRNG key of ``[dynamics] seed``."""
        import jax

        return jax.random.PRNGKey(self.seed)

    def initial(self, key=None):
        """Initial states ``(batch, tokens, d)``: uniform on the sphere from ``seed``, or the ``init`` file."""
        import jax

        from ..evolve import sample

        self._need_dtype()
        if self.init_array is None:
            key = self.key() if key is None else key
            return sample.sphere(key, (self.batch, self.tokens, self.d), dtype=self.dtype)
        return jax.numpy.asarray(self.init_array, dtype=self.dtype)

    def simulate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`attnflow.simulate` (solver, budget, saves, tol and backend)."""
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
        kw["backend"] = self.backend
        return kw

    def identity(self) -> dict[str, Any]:
        """What makes a run this run: the config, the input files by content, the dtype and the backend asked for."""
        return {"config": self.raw, "inputs": self.inputs, "dtype": self.dtype, "backend": self.backend}


def _load_weights(path: Path, m: ModelTable, dtype: str, inputs: dict) -> dict[str, np.ndarray]:
    where = f"{path}: [model]"
    d, heads = m.d, m.heads
    inline = [k for k in ("V", "Q", "K", "O") if getattr(m, k) is not None]
    if m.weights is not None:
        if inline:
            raise ConfigError(f"{where} give either weights = '...npz' or inline V/Q/K/O, not both")
        from .weights import WeightsError, read_npz

        wp = _resolve(path, m.weights)
        data = _read_bytes(f"{where} weights", wp)
        inputs["weights"] = {"path": str(wp), "sha256": hashlib.sha256(data).hexdigest()}
        try:
            raw = read_npz(data, wp)
        except WeightsError as e:
            raise ConfigError(f"{where} {e}") from None
        arrs = {k: _real_array(f"{where} weights {wp.name}: {k}", v) for k, v in raw.items()}
        missing = [k for k in ("Q", "K", "V") if k not in arrs]
        if missing:
            raise ConfigError(f"{where} weights file {str(wp)!r} lacks arrays {', '.join(missing)} (has {', '.join(arrs) or 'none'})")
        extra = sorted(set(arrs) - {"Q", "K", "V", "O", "bq", "bk", "bv", "bo"})
        if extra:
            raise ConfigError(f"{where} weights file {str(wp)!r} has unexpected arrays {', '.join(extra)} "
                              "(expected Q, K, V, O and optional biases bq, bk, bv, bo)")
        Q = arrs["Q"]
        if Q.ndim != 3 or Q.shape[0] != heads or Q.shape[2] != d:
            raise ConfigError(f"{where} weights {wp.name}: Q must have shape (heads, dh, d) = ({heads}, dh, {d}), got {Q.shape}")
        if "O" not in arrs:
            if heads != 1 or Q.shape[1] != d:
                raise ConfigError(f"{where} weights {wp.name}: O (heads, d, dh) is required unless heads = 1 and dh = d")
            arrs["O"] = np.eye(d)[None]
        out = {k: arrs[k] for k in ("Q", "K", "V", "O", "bq", "bk", "bv", "bo") if k in arrs}  # Heads checks the shapes
        label = f"{where} weights {wp.name}:"
    else:
        if heads != 1:
            raise ConfigError(f"{where} inline weights (V = [[...]]) are for heads = 1; use weights = 'file.npz' for {heads} heads")
        if m.V is None:
            raise ConfigError(f"{where} needs weights = 'file.npz' or an inline V = [[...], ...]")
        mats = {}
        for name in ("V", "Q", "K", "O"):
            a = np.eye(d) if getattr(m, name) is None else np.asarray(getattr(m, name), dtype=np.float64)
            if a.shape != (d, d):
                raise ConfigError(f"{where} {name} must have shape ({d}, {d}), got {a.shape}")
            mats[name] = a[None]
        out = mats
        label = where
    for name, a in out.items():
        if not np.all(np.isfinite(a)):
            raise ConfigError(f"{label} {name} contains non-finite values")
        _check_fits(f"{label} {name}", a, dtype)
    return out


def parse_config(raw: dict, path: str | Path = "<config>") -> RunConfig:
    """Validate a TOML dictionary against the schema (see :func:`reference`); reads the input files it names."""
    from ..model.attention import parse_mask

    path = Path(path)
    for t in raw:
        if t not in TABLES:
            raise ConfigError(f"{path}: unknown table [{t}]{_did_you_mean(t, TABLES)}")
    if "model" not in raw:
        raise ConfigError(f"{path}: missing [model] table")
    f = ConfigFile(**{t: parse_table(cls, raw.get(t, {}), f"{path}: [{t}]") for t, cls in TABLES.items()})
    m, dy = f.model, f.dynamics
    wm, wd = f"{path}: [model]", f"{path}: [dynamics]"
    dtype = dy.dtype
    inputs: dict[str, dict[str, str]] = {}
    try:
        mask, window = parse_mask(m.mask)
    except ValueError as e:
        raise ConfigError(f"{wm} {e}") from None
    _check_fits(f"{wm} beta", m.beta, dtype)
    _check_fits(f"{wd} alpha", dy.alpha, dtype)
    weights = _load_weights(path, m, dtype, inputs)
    time = dy.time
    norm, steps, solver, t1, dt = _time_budget(wd, dy, dtype)
    init_array, states_array = _state_files(path, f, dtype, inputs)
    _check_tables(path, f, dtype)
    cfg = RunConfig(
        path=path, raw=raw, file=f, d=m.d, num_heads=m.heads, weights=weights, beta=m.beta, attention=m.attention,
        mask=mask, window=window, sinkhorn_iters=m.sinkhorn_iters, relu_normalize=m.relu_normalize, time=time,
        alpha=dy.alpha, norm=norm, tokens=dy.tokens, steps=steps, t1=t1, dt=dt, solver=solver, saves=dy.saves,
        tol=dy.tol, rtol=dy.rtol, atol=dy.atol, batch=dy.batch, init=dy.init, dtype=dtype, seed=dy.seed,
        backend=dy.backend, inputs=inputs, init_array=init_array, states_array=states_array,
    )
    # the model constructors check what they own (beta, alpha, kinds, masks, shapes): ask them, once
    try:
        cfg._build()
    except (ValueError, TypeError) as e:
        table = "[dynamics]" if str(e).startswith(("alpha", "unknown norm")) else "[model]"
        raise ConfigError(f"{path}: {table} {_one_line(e)}") from None
    return cfg


def _time_budget(wd: str, dy: DynamicsTable, dtype: str):
    """(norm, steps, solver, t1, dt) of the [dynamics] table, with the step count checked against int32."""
    steps = t1 = dt = None
    if dy.time == "discrete":
        norm = dy.norm or "l2"
        if norm not in ("l2", "layernorm", "none"):
            raise ConfigError(f"{wd} norm must be one of 'l2', 'layernorm', 'none' for time = 'discrete', got {norm!r}")
        steps, solver, total = dy.steps, "iterate", dy.steps
    else:
        norm = dy.norm or "sphere"
        if norm not in ("sphere", "flat"):
            raise ConfigError(f"{wd} norm must be one of 'sphere', 'flat' for time = 'continuous', got {norm!r}")
        solver, t1 = dy.solver, dy.t1
        _check_fits(f"{wd} t1", t1, dtype)
        total = None
        if solver != "adaptive":
            dt = dy.dt
            _check_fits(f"{wd} dt", dt, dtype)
            ratio = t1 / dt
            if not math.isfinite(ratio) or ratio > STEPS_MAX + 0.5:
                raise ConfigError(f"{wd} t1 / dt = {ratio:.3g} steps is more than {STEPS_MAX}; use a larger dt or solver = 'adaptive'")
            total = round(ratio)
            if total < 1 or abs(total * dt - t1) > 1e-9 * max(1.0, t1):
                raise ConfigError(f"{wd} t1 = {t1} must be a whole number of steps dt = {dt}")
    if dy.saves is not None and total is not None and total % dy.saves:
        raise ConfigError(f"{wd} saves = {dy.saves} must divide the number of steps ({total})")
    if dy.saves is not None and total is not None and dy.saves > total:
        raise ConfigError(f"{wd} saves = {dy.saves} must be at most the number of steps ({total})")
    return norm, steps, solver, t1, dt


def _state_files(path: Path, f: ConfigFile, dtype: str, inputs: dict):
    """The [dynamics] init and [stability] states arrays (None when not given), read, hashed and checked."""
    dy, m, wd = f.dynamics, f.model, f"{path}: [dynamics]"
    init_array = states_array = None
    if dy.init != "uniform":
        p = _resolve(path, dy.init)
        init_array, h = load_npy(f"{wd} init", p)
        inputs["init"] = {"path": str(p), "sha256": h}
        want = (dy.batch, dy.tokens, m.d)
        if init_array.shape != want:
            raise ConfigError(f"{wd} init file {str(p)!r} has shape {init_array.shape}, expected (batch, tokens, d) = {want}")
        _check_fits(f"{wd} init file {str(p)!r}", init_array, dtype)
    if f.stability.states is not None:
        p = _resolve(path, f.stability.states)
        states_array, h = load_npy(f"{path}: [stability] states", p)
        inputs["states"] = {"path": str(p), "sha256": h}
        if states_array.ndim == 2:
            states_array = states_array[None]
        if states_array.ndim != 3 or states_array.shape[1:] != (dy.tokens, m.d) or len(states_array) == 0:
            raise ConfigError(f"{path}: [stability] states must have shape (k, {dy.tokens}, {m.d}) or ({dy.tokens}, {m.d}), "
                              f"got {states_array.shape}")
    return init_array, states_array


def _check_tables(path: Path, f: ConfigFile, dtype: str) -> None:
    """Cross-key checks of the command tables (indices within the model's sizes, values within the dtype)."""
    n, d = f.dynamics.tokens, f.model.d

    def where_eq(table, sub, eig, split, around=None):
        w = f"{path}: [{table}] {sub}"
        if eig >= d:
            raise ConfigError(f"{w} eigenvector = {eig} is out of range: W has {d} eigenvectors (0 .. {d - 1})")
        if split >= n:
            raise ConfigError(f"{w} split = {split} is out of range: a bipartite split needs 1 <= split < tokens = {n}")
        if around == "bipartite" and split == 0:
            raise ConfigError(f"{w} around = 'bipartite' needs split = m with 1 <= m < tokens = {n}")
        if around == "consensus" and split != 0:
            raise ConfigError(f"{w} split = {split} is for around = 'bipartite'; around = 'consensus' takes split = 0")

    b = f.basins
    if isinstance(b.sampler, SamplerTable):
        where_eq("basins", "sampler", b.sampler.eigenvector, b.sampler.split, b.sampler.around)
        _check_fits(f"{path}: [basins] sampler radius", b.sampler.radius, dtype)
    if b.local is not None:
        where_eq("basins", "local", b.local.eigenvector, b.local.split)
    if b.continuation is not None:
        _check_fits(f"{path}: [basins] continuation values", b.continuation.values, dtype)
        if b.continuation.param == "alpha" and f.dynamics.time != "discrete":
            raise ConfigError(f"{path}: [basins] continuation param = 'alpha' needs time = 'discrete' (a flow has no step size)")
    s = f.stability
    if s.continuation is not None:
        c = s.continuation
        where_eq("stability", "continuation", c.eigenvector, c.split)
        _check_fits(f"{path}: [stability] continuation start/stop", [c.start, c.stop], dtype)
    if s.clustering is not None and s.clustering.clusters > n:
        raise ConfigError(f"{path}: [stability] clustering clusters = {s.clustering.clusters} exceeds tokens = {n}")
    e = f.energy
    if (e.w is None) != (e.m is None) or (e.w is not None and len(e.w) != len(e.m)):
        raise ConfigError(f"{path}: [energy] give both w and m, one value per head")


def read_toml(path: str | Path) -> dict:
    """The TOML dictionary of a config file (no validation); one-line errors for missing or malformed files."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} not found")
    if path.is_dir():
        raise ConfigError(f"config path {str(path)!r} is a directory, expected a .toml file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {_one_line(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} could not be read: {e.strerror or e}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML run configuration (no side effects: JAX's settings are left alone)."""
    return parse_config(read_toml(path), Path(path))


if __name__ == "__main__":  # pragma: no cover
    print(reference())
