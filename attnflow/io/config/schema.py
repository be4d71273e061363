"""The declarative schema of a run configuration: one typed record per TOML table, and its documentation.

Every key is a dataclass field made by :func:`key`, whose metadata carries its meaning and its constraints
(``choices``, ``ge``/``gt``/``le``/``lt``); :mod:`.validate` checks a TOML value against them, :func:`reference`
renders the whole schema as commented TOML and :func:`describe` one table as a paragraph (the commands' ``--help``).

Every integer key is bounded: attnflow counts steps, tokens, members and samples with int32, so no integer key
may exceed ``INT32_MAX`` = 2^31 - 1 (seeds, which are uint32 PRNG seeds, stop at 2^32 - 1).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Union

from ...model.attention import KINDS

SEED_MAX = 2**32 - 1  # jax.random.PRNGKey(seed) is injective on [0, 2^32); larger seeds would collide
INT32_MAX = 2**31 - 1  # counters (steps, members, samples, indices) are int32
STEPS_MAX = INT32_MAX  # step counters are int32
SINKHORN_ITERS_MAX = 1000  # the Sinkhorn sweeps are unrolled when the model is traced
Matrix = list  # a TOML array of arrays of numbers (annotation marker)


def key(default=MISSING, *, doc: str, choices=None, ge=None, gt=None, le=None, lt=None, example=None, checked_by=None,
        speed_only: bool = False):
    """A schema entry: a dataclass field whose metadata carries its documentation and its constraints.

    `checked_by` names the model constructor that already validates the value (its `choices` are then
    documentation only: the check is not repeated here). `speed_only`: the value changes how fast a run goes,
    never its result, so it is no part of the run's identity (a run resumes with another value)."""
    meta = dict(doc=doc, choices=choices, ge=ge, gt=gt, le=le, lt=lt, example=example, checked_by=checked_by,
                speed_only=speed_only)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------- the schema
@dataclass(frozen=True)
class ModelTable:
    """[model]: the attention layer."""

    d: int = key(doc="dimension of the token space", ge=1, le=INT32_MAX, example=3)
    heads: int = key(1, doc="number of attention heads", ge=1, le=INT32_MAX)
    weights: Union[str, None] = key(None, doc="path of an .npz with Q, K, V (heads, dh, d) and O (heads, d, dh), O optional when heads = 1; optional biases bq, bk, bv (heads, dh), bo (d,); at most 2 GiB of arrays", example="w.npz")
    V: Union[Matrix, None] = key(None, doc="inline (d, d) value matrix, one head (instead of weights)")
    Q: Union[Matrix, None] = key(None, doc="inline (d, d) query matrix, one head (default identity)")
    K: Union[Matrix, None] = key(None, doc="inline (d, d) key matrix, one head (default identity)")
    O: Union[Matrix, None] = key(None, doc="inline (d, d) output matrix, one head (default identity)")
    beta: float = key(1.0, doc="inverse temperature (> 0)")
    attention: str = key("softmax", doc="attention kind", choices=KINDS, checked_by="Attention")
    mask: str = key("full", doc="full | causal | window:W (1 <= W <= 2^31 - 1)")
    sinkhorn_iters: int = key(3, doc="Sinkhorn iterations (attention = 'sinkhorn')", ge=1, le=SINKHORN_ITERS_MAX)
    relu_normalize: bool = key(False, doc="normalise relu attention rows to sum 1")
    key_block: Union[int, str] = key("auto", doc="how the attention is formed: 'auto' (dense up to 512 tokens, else streamed over blocks of 256 keys), 'dense', or a key block size b >= 1 (memory O(n b) per member; not with sinkhorn)", ge=1, le=INT32_MAX, choices=("auto", "dense"))


@dataclass(frozen=True)
class DynamicsTable:
    """[dynamics]: the evolution and the ensemble."""

    time: str = key("discrete", doc="discrete layer map or continuous flow", choices=("discrete", "continuous"))
    alpha: float = key(0.1, doc="step size of the discrete map (> 0)")
    norm: Union[str, None] = key(None, doc="l2 | layernorm | none (discrete, default l2); sphere | flat (continuous, default sphere)")
    tokens: int = key(10, doc="tokens n per configuration", ge=1, le=INT32_MAX)
    steps: int = key(1000, doc="steps of the discrete map", ge=1, le=STEPS_MAX)
    t1: float = key(10.0, doc="end time of the continuous flow", gt=0)
    dt: float = key(0.01, doc="fixed step of the continuous flow (t1 a whole number of steps)", gt=0)
    solver: Union[str, None] = key(None, doc="continuous solver (default: 'adaptive' for `attnflow basins` studies of a flow, each member stepped by an embedded Runge-Kutta pair to its own steady state; 'rk4' with dt elsewhere)", choices=("rk4", "euler", "adaptive"))
    rtol: float = key(1e-6, doc="relative tolerance (solver = 'adaptive')", gt=0)
    atol: float = key(1e-8, doc="absolute tolerance (solver = 'adaptive')", gt=0)
    saves: Union[int, None] = key(None, doc="save the trajectory at this many equally spaced points", ge=1, le=INT32_MAX)
    tol: Union[float, None] = key(None, doc="stop each member once its per-step change is below tol", gt=0)
    batch: int = key(100, doc="ensemble members", ge=1, le=INT32_MAX)
    init: str = key("uniform", doc="'uniform' on the sphere, or a .npy of shape (batch, tokens, d), at most 2 GiB")
    dtype: str = key("float32", doc="floating dtype", choices=("float32", "float64"))
    seed: int = key(0, doc="PRNG seed", ge=0, le=SEED_MAX)
    backend: str = key("auto", doc="computing path of attnflow.simulate", choices=("auto", "xla", "lanes", "fused"))


@dataclass(frozen=True)
class SamplerTable:
    """[basins] sampler = {...}: initial states near an equilibrium."""

    around: str = key("consensus", doc="equilibrium to sample around", choices=("consensus", "bipartite"))
    eigenvector: int = key(0, doc="index of the real eigenvector of W", ge=0, le=INT32_MAX)
    split: int = key(0, doc="bipartite split m (1 <= m < tokens); 0 for consensus", ge=0, le=INT32_MAX)
    radius: float = key(0.1, doc="perturbation radius", gt=0)


@dataclass(frozen=True)
class BasinsContinuationTable:
    """[basins] continuation = {...}: basin fractions along a parameter."""

    param: str = key(doc="parameter to sweep", choices=("beta", "alpha"), example="beta")
    values: list[float] = key(doc="values of the parameter (each > 0)", gt=0, example=[0.5, 1.0, 2.0])


@dataclass(frozen=True)
class LocalTable:
    """[basins] local = {...}: local basin radius of an equilibrium."""

    eigenvector: int = key(0, doc="index of the real eigenvector of W", ge=0, le=INT32_MAX)
    split: int = key(0, doc="bipartite split m; 0 for consensus", ge=0, le=INT32_MAX)
    q: float = key(0.9, doc="fraction of perturbations that must return", gt=0, lt=1)
    samples: int = key(128, doc="perturbations per radius", ge=1, le=INT32_MAX)


@dataclass(frozen=True)
class BasinsTable:
    """[basins]: Monte Carlo basin fractions (``attnflow basins``)."""

    samples: int = key(1000, doc="initial states (samples are numbered with int32: at most 2^31 - 1)", ge=1, le=INT32_MAX)
    seed: Union[int, None] = key(None, doc="PRNG seed (default [dynamics] seed)", ge=0, le=SEED_MAX)
    chunk_size: Union[int, None] = key(None, doc="states per chunk (default min(samples, 10000)); part of the run's identity", ge=1, le=INT32_MAX)
    tol: Union[float, None] = key(None, doc="convergence tolerance (default [dynamics] tol, else max(1e-7, 8 x the floor the dtype resolves, 8 x (atol + rtol) |W| for the adaptive solver); below the dtype's floor it is refused)", gt=0)
    cluster_tol: float = key(1e-3, doc="classifier tolerance", gt=0)
    ci_width: Union[float, None] = key(None, doc="adaptive: add chunks until every 95% interval is narrower", gt=0, lt=1)
    max_steps: Union[int, None] = key(None, doc="hard cap of steps per member; members still moving there are 'not converged' (default max(10 x [dynamics] steps or t1/dt, 10000), at most 2^31 - 1; the adaptive solver counts attempted steps, default 10000)", ge=1, le=STEPS_MAX)
    round_steps: Union[int, None] = key(None, doc="steps between two retire-and-refill passes of the member pool (Execution.group; default 4 for the adaptive solver, else 8); speed only", ge=1, le=INT32_MAX, speed_only=True)
    pool_size: Union[int, None] = key(None, doc="member slots per device (default: one tile of the pool's step: on the lanes backend the slots whose step fits a 2 MiB cache, a power of two in [128, 4096], on xla on a CPU 128); speed only: the pool steps in tiles of a fixed width, so members are the same bits for any pool size (not on a GPU's xla backend, which has no tiles: there it may change last bits)", ge=1, le=INT32_MAX, speed_only=True)
    workers: Union[int, None] = key(None, doc="worker processes on a CPU, one member pool each, with a one-thread XLA (default 0: the pools run in the attnflow process, see cores); speed only", ge=0, le=64, speed_only=True)
    cores: Union[int, None] = key(None, doc="one-thread XLA clients in the attnflow process that run the member pools on a CPU, one pool each, at once (0: the pools run on JAX's devices; default one per core, at most 8 and at most one per pool of samples, for a study without workers in one process on one CPU device); speed only", ge=0, le=64, speed_only=True)
    certify: bool = key(True, doc="decide members early, inside certified contracting balls around stable equilibria (outcome certified); computed where they pay: tokens x d <= 32, or samples >= 20 (tokens x d)^2")
    initial: bool = key(False, doc="also store each sample's initial state in the run directory's per-sample table (column initial)")
    sampler: Union[str, SamplerTable] = key("uniform", doc="'uniform', or a table {around, eigenvector, split, radius}", choices=("uniform",))
    continuation: Union[BasinsContinuationTable, None] = key(None, doc="{param = 'beta' | 'alpha', values = [...]}")
    local: Union[LocalTable, None] = key(None, doc="{eigenvector, split, q, samples}")


@dataclass(frozen=True)
class ClusteringTable:
    """[stability] clustering = {...}: a search for equilibria not aligned with an eigenvector."""

    starts: int = key(64, doc="random starts", ge=1, le=INT32_MAX)
    clusters: int = key(2, doc="clusters per start", ge=1, le=INT32_MAX)


@dataclass(frozen=True)
class StabilityContinuationTable:
    """[stability] continuation = {...}: follow one equilibrium along a parameter."""

    start: float = key(doc="first value (> 0)", gt=0, example=0.5)
    stop: float = key(doc="last value (> 0)", gt=0, example=2.0)
    param: str = key("beta", doc="parameter", choices=("beta", "alpha"))
    num: int = key(20, doc="number of values", ge=1, le=INT32_MAX)
    eigenvector: int = key(0, doc="index of the real eigenvector of W", ge=0, le=INT32_MAX)
    split: int = key(0, doc="bipartite split m; 0 for consensus", ge=0, le=INT32_MAX)


@dataclass(frozen=True)
class StabilityTable:
    """[stability]: equilibria and their stability (``attnflow stability``)."""

    states: Union[str, None] = key(None, doc="a .npy of states (k, tokens, d) or (tokens, d), refined first; at most 2 GiB")
    clustering: Union[ClusteringTable, None] = key(None, doc="{starts, clusters}")
    continuation: Union[StabilityContinuationTable, None] = key(None, doc="{param, start, stop, num, eigenvector, split}")
    tol: Union[float, None] = key(None, doc="tolerance of the stability verdict (default per dtype: 1e-8 float64, 1e-4 float32)", gt=0)


@dataclass(frozen=True)
class EnergyTable:
    """[energy]: energies and monotonicity (``attnflow energy``)."""

    tol: Union[float, None] = key(None, doc="relative tolerance of 'non-decreasing' (default 1e-10 float64, 1e-5 float32)", gt=0)
    members: int = key(16, doc="ensemble members traced (the JSON reports member 0)", ge=1, le=INT32_MAX)
    eps: float = key(1e-3, doc="T_eps(beta) figure: cluster threshold rho >= 1 - eps", gt=0, lt=1)
    rho0: float = key(0.0, doc="equiangular start of the T_eps(beta) figure", gt=-1, lt=1)
    points: int = key(60, doc="number of beta values of the figure", ge=2, le=INT32_MAX)
    beta_max: Union[float, None] = key(None, doc="largest beta of the figure (default 4 beta_c)", gt=0)
    w: Union[list[float], None] = key(None, doc="scalar heads w_h (with m; default tr(W_h)/d)")
    m: Union[list[float], None] = key(None, doc="scalar heads m_h (with w; default tr(M_h)/d)")


@dataclass(frozen=True)
class MetastabilityTable:
    """[metastability]: plateaus, dwell times and phase diagrams (``attnflow metastability``)."""

    tokens: list[int] = key((64,), doc="token counts n of the sweep (each >= 2)", ge=2, le=INT32_MAX)
    betas: list[float] = key((2.0, 3.0, 4.0, 5.0), doc="values of beta of the sweep (each > 0; all in one compiled call)", gt=0)
    members: int = key(32, doc="random initial states per (n, beta), uniform on the sphere (the same for every beta)", ge=1, le=INT32_MAX)
    t1: float = key(100.0, doc="how long each member runs (a map: steps)", gt=0)
    dt: float = key(0.1, doc="fixed RK4 step of a flow", gt=0)
    seed: Union[int, None] = key(None, doc="PRNG seed of the members (default [dynamics] seed)", ge=0, le=SEED_MAX)
    fraction: float = key(0.1, doc="a plateau: speed below this fraction of its peak since the last exit", gt=0, lt=1)
    min_duration: float = key(2.0, doc="... held with a constant cluster count for at least this long", gt=0)
    eps: float = key(1e-2, doc="tokens with cos > 1 - eps are in one cluster (at least 64 ulp of the dtype)", gt=0, lt=1)
    check: float = key(0.25, doc="time between two readings of speed, clusters and energy", gt=0)
    max_episodes: int = key(16, doc="episodes stored per member", ge=1, le=4096)
    trace: int = key(4, doc="members whose readings are kept for the staircase figure", ge=0, le=INT32_MAX)
    phase: bool = key(True, doc="also the (t, beta) phase diagram at the first n and, with several n, the (beta, n) one at t1")


@dataclass(frozen=True)
class GeometryTable:
    """[geometry]: a basin map on a 2-D slice, its entropy, the uncertainty exponent, minimal fatal shocks and tipping
    (``attnflow geometry``)."""

    token: int = key(0, doc="the token whose two angles span the slice (d = 3: polar and azimuthal; d = 2: the angles of this token and the next)", ge=0, le=INT32_MAX)
    resolution: int = key(100, doc="grid points per side of the slice", ge=2, le=100000)
    box: int = key(6, doc="box size (pixels) of the basin entropy", ge=1, le=100000)
    tail: int = key(16, doc="final samples per member for the recurrence labels", ge=2, le=INT32_MAX)
    tol: float = key(1e-5, doc="recurrence tolerance (a fixed point: the final samples within tol of the last)", gt=0)
    match_tol: float = key(1e-3, doc="two members share an attractor when their invariants are within this", gt=0)
    shock: bool = key(False, doc="also the minimal fatal shock of every attractor found (directions x radii members each)")
    directions: int = key(64, doc="directions of the fatal-shock search", ge=1, le=INT32_MAX)
    radii: int = key(32, doc="radii per direction of the fatal-shock search, up to r_max", ge=1, le=INT32_MAX)
    r_max: float = key(1.0, doc="largest shock tried", gt=0)
    tipping_beta: Union[float, None] = key(None, doc="tipping from [model] beta to this beta: P(attractor after | attractor before) from the slice's members", gt=0)
    rows_per_block: int = key(16, doc="grid rows per block (each block is saved: a rerun resumes after the last)", ge=1, le=INT32_MAX)


@dataclass(frozen=True)
class ConfigFile:
    """The whole TOML file: one record per table."""

    model: ModelTable = key(doc="the attention layer")
    dynamics: DynamicsTable = key(DynamicsTable(), doc="the evolution and the ensemble")
    basins: BasinsTable = key(BasinsTable(), doc="attnflow basins")
    stability: StabilityTable = key(StabilityTable(), doc="attnflow stability")
    energy: EnergyTable = key(EnergyTable(), doc="attnflow energy")
    metastability: MetastabilityTable = key(MetastabilityTable(), doc="attnflow metastability")
    geometry: GeometryTable = key(GeometryTable(), doc="attnflow geometry")


def hints(cls) -> dict[str, Any]:
    """The resolved annotations of a record type."""
    return typing.get_type_hints(cls)


TABLES: dict[str, type] = dict(hints(ConfigFile))  # table name -> record type

INPUT_KEYS = (("model", "weights"), ("dynamics", "init"), ("stability", "states"))
"""The (table, key) pairs that name input files: read at load, identified by content (SHA-256), not by path."""

SPEED_ONLY = tuple((t, f.name) for t, cls in TABLES.items() if dataclasses.is_dataclass(cls)
                   for f in dataclasses.fields(cls) if f.metadata.get("speed_only"))
"""The (table, key) pairs that change speed only, never a result: not part of a run's identity."""


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
        tp = hints(TABLES[table])[f.name]
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
