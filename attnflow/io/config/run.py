"""The run configuration: a TOML file -> validated typed tables (:mod:`.schema`, :mod:`.validate`) -> a
:class:`RunConfig` that builds the model, the initial states and the options of the commands.

Loading has no side effects: nothing here switches JAX to float64. A ``dtype = "float64"`` config needs
``jax.config.update("jax_enable_x64", True)`` before :meth:`RunConfig.build` (the ``attnflow`` command line
does this at its edge, in ``attnflow.cli._common.load_run_config``).

Input files (weights, init, states) are read once, at load, and their SHA-256 hashes are kept in
:attr:`RunConfig.inputs`, so that a run directory can record its inputs by content. :meth:`RunConfig.identity`
is what makes a run this run, by value: the parsed tables (``beta = 1`` and ``beta = 1.0`` are the same run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .schema import (
    INPUT_KEYS, SPEED_ONLY, TABLES, BasinsTable, ConfigFile, DynamicsTable, EnergyTable, ModelTable,
    SamplerTable, StabilityTable,
)
from .validate import (
    MAX_CONFIG_BYTES, MAX_NESTING, ConfigError, check_fits, check_nesting, did_you_mean, load_npy, one_line, parse_table,
    read_bytes, real_array,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# ----------------------------------------------------------------------------------------- input files
def _resolve(base: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else base.parent / q


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
    solver: str | None
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

    @property
    def geometry(self):
        """The ``[geometry]`` table."""
        return self.file.geometry

    @property
    def metastability(self):
        """The ``[metastability]`` table."""
        return self.file.metastability

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
        from ...model.heads import Heads

        w = {k: np.asarray(v, dtype=self.dtype) for k, v in self.weights.items()}
        return Heads(**w)

    def attention_module(self):
        """The :class:`Attention` the config describes (kind, mask, options)."""
        from ...model.attention import Attention

        return Attention(self.attention, self.mask, self.window, self.sinkhorn_iters, self.relu_normalize)

    def build(self):
        """The configured dynamics (a :class:`LayerMap`, :class:`SphereFlow` or :class:`FlatFlow`)."""
        self._need_dtype()
        return self._build()

    def _build(self):
        from ...model import FlatFlow, LayerMap, SelfAttention, SphereFlow, make_norm

        kb = self.model.key_block
        attn = SelfAttention(self.heads, self.attention_module(), np.asarray(self.beta, dtype=self.dtype),
                             key_block=None if kb == "dense" else kb)
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

        from ...evolve import sample

        self._need_dtype()
        if self.init_array is None:
            key = self.key() if key is None else key
            return sample.sphere(key, (self.batch, self.tokens, self.d), dtype=self.dtype)
        return jax.numpy.asarray(self.init_array, dtype=self.dtype)

    # ---- the typed options, built once from the tables (attnflow.evolve.options) ----------------------------
    @property
    def budget(self):
        """The :class:`~attnflow.Budget`: ``[dynamics] steps`` (maps) or ``t1``, ``dt`` (flows; ``t1`` only for the
        adaptive solver), and ``[basins] max_steps``."""
        from ...evolve.options import Budget

        return Budget(steps=self.steps, t1=self.t1, dt=self.dt, max_steps=self.basins.max_steps)

    def solver_object(self, study: bool = False):
        """The solver of ``[dynamics] solver`` (None for a map: ``Iterate``, the default). Unset, a flow takes the
        adaptive pair in a basin study (`study`) and fixed RK4 elsewhere."""
        from ...evolve.solvers import Adaptive, make_solver

        if self.time == "discrete":
            return None
        name = self.solver or ("adaptive" if study else "rk4")
        return Adaptive(rtol=self.rtol, atol=self.atol) if name == "adaptive" else make_solver(name)

    @property
    def stop(self):
        """The :class:`~attnflow.Stop` of a simulation: ``[dynamics] tol`` (None: run the whole budget)."""
        from ...evolve.options import Stop

        return Stop(self.tol)

    @property
    def basins_stop(self):
        """The :class:`~attnflow.Stop` of a basin study: ``[basins] tol``, else ``[dynamics] tol``, else None (the
        study's default for the dtype: :func:`attnflow.evolve.options.check_tol`); ``[basins] certify``."""
        from ...evolve.options import Stop

        b = self.basins
        return Stop(b.tol if b.tol is not None else self.tol, certify=b.certify)

    def execution(self, *, chunk: int | None = None):
        """The :class:`~attnflow.Execution` of a simulation: ``[dynamics] backend`` and a chunk (memory)."""
        from ...evolve.options import Execution

        return Execution(backend=self.backend, chunk=chunk)

    def basins_execution(self, *, pool: int | None = None, process: tuple[int, int] | None = None):
        """The :class:`~attnflow.Execution` of a basin study: ``[dynamics] backend``, ``[basins] chunk_size``,
        ``pool_size`` (or `pool`), ``round_steps`` (the group), ``workers`` and ``cores``."""
        from ...evolve.options import Execution

        b = self.basins
        if b.workers and b.cores:
            raise self.error("[basins] workers and cores both run the study's pools (in processes, or in this one): set "
                             "one of them")
        return Execution(backend=self.backend, chunk=self.basins_chunk_size, pool=b.pool_size if pool is None else pool,
                         group=b.round_steps, process=process, workers=b.workers, cores=b.cores)

    def canonical(self) -> dict[str, dict[str, Any]]:
        """The configuration by value, as JSON values: every table of the schema, parsed and typed (floats as
        floats, integers as integers, arrays as lists), with the schema's defaults filled in, and the defaults
        that are pure functions of the file resolved (``[dynamics] norm``, ``[basins] seed`` and ``chunk_size``;
        ``[model] mask`` as parsed).
        Two files that spell the same values differently (``beta = 1`` and ``beta = 1.0``, a default written out
        or left out, key order, comments) have the same canonical form."""
        out = {t: _json_values(getattr(self.file, t)) for t in TABLES}
        out["model"]["mask"] = self.mask if self.window is None else f"window:{self.window}"  # not " window:05"
        out["dynamics"]["norm"] = self.norm
        out["basins"]["seed"] = self.basins_seed
        out["basins"]["chunk_size"] = self.basins_chunk_size
        return out

    @property
    def basins_seed(self) -> int:
        """``[basins] seed``, or ``[dynamics] seed`` when it is not given."""
        return self.seed if self.basins.seed is None else self.basins.seed

    @property
    def basins_chunk_size(self) -> int:
        """``[basins] chunk_size``, or ``min(samples, 10000)`` when it is not given (never chosen from free memory:
        the chunks are part of a run's identity)."""
        b = self.basins
        return min(b.samples, 10_000) if b.chunk_size is None else b.chunk_size

    def identity(self) -> dict[str, Any]:
        """What makes a run this run, by value (JSON values): the :meth:`canonical` config without the paths of
        its input files (hosts may mount them differently) and without the keys that change speed only
        (:data:`~attnflow.io.config.schema.SPEED_ONLY`), the input files by content (``inputs``: name ->
        SHA-256), the dtype and the backend asked for."""
        config = self.canonical()
        for table, k in INPUT_KEYS:
            if k in self.inputs:
                config[table].pop(k, None)
        for table, k in SPEED_ONLY:  # speed only, never the result: a run resumes with other values
            config[table].pop(k, None)
        return {"config": config, "inputs": {k: v["sha256"] for k, v in self.inputs.items()}, "dtype": self.dtype,
                "backend": self.backend}


def _json_values(v):
    """A parsed table (a record, tuples, floats, ...) as JSON values: dicts, lists, numbers, strings, None."""
    if dataclasses.is_dataclass(v):
        return {f.name: _json_values(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_json_values(x) for x in v]
    return v


def _load_weights(path: Path, m: ModelTable, dtype: str, inputs: dict) -> dict[str, np.ndarray]:
    where = f"{path}: [model]"
    d, heads = m.d, m.heads
    inline = [k for k in ("V", "Q", "K", "O") if getattr(m, k) is not None]
    if m.weights is not None:
        if inline:
            raise ConfigError(f"{where} give either weights = '...npz' or inline V/Q/K/O, not both")
        from ..weights import WeightsError, read_npz

        wp = _resolve(path, m.weights)
        data = read_bytes(f"{where} weights file", wp)
        inputs["weights"] = {"path": str(wp), "sha256": hashlib.sha256(data).hexdigest()}
        try:
            raw = read_npz(data, wp)
        except WeightsError as e:
            raise ConfigError(f"{where} {e}") from None
        arrs = {k: real_array(f"{where} weights {wp.name}: {k}", v) for k, v in raw.items()}
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
        check_fits(f"{label} {name}", a, dtype)
    return out


def parse_config(raw: dict, path: str | Path = "<config>") -> RunConfig:
    """Validate a TOML dictionary against the schema (see :func:`reference`); reads the input files it names."""
    from ...model.attention import parse_mask

    path = Path(path)
    check_nesting(str(path), raw)
    for t in raw:
        if t not in TABLES:
            raise ConfigError(f"{path}: unknown table [{str(t)[:40]}]{did_you_mean(str(t)[:100], TABLES)}")
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
    check_fits(f"{wm} beta", m.beta, dtype)
    check_fits(f"{wd} alpha", dy.alpha, dtype)
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
        raise ConfigError(f"{path}: {table} {one_line(e)}") from None
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
        check_fits(f"{wd} t1", t1, dtype)
        total = None
        if solver != "adaptive":
            dt = dy.dt
            check_fits(f"{wd} dt", dt, dtype)
            from ...evolve.options import Budget

            try:  # the step arithmetic and its messages live in Budget
                Budget(t1=t1, dt=dt)
            except ValueError as e:
                raise ConfigError(f"{wd} {one_line(e)}") from None
            total = round(t1 / dt)
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
        check_fits(f"{wd} init file {str(p)!r}", init_array, dtype)
        if dy.time == "continuous" and dy.norm == "sphere" and init_array.size:
            from ...evolve.outcome import DEGENERATE_TOL

            off = np.abs(np.linalg.norm(np.asarray(init_array, np.float64), axis=-1) - 1.0)
            if np.nanmax(off) > DEGENERATE_TOL:
                b, i = np.unravel_index(int(np.nanargmax(off)), off.shape)
                raise ConfigError(f"{wd} init file {str(p)!r}: state {b} token {i} has norm "
                                  f"{np.linalg.norm(init_array[b, i]):.4g}; the sphere flow needs tokens of unit norm "
                                  f"(within {DEGENERATE_TOL:g}): normalise each row")
    if f.stability.states is not None:
        p = _resolve(path, f.stability.states)
        states_array, h = load_npy(f"{path}: [stability] states", p)
        inputs["states"] = {"path": str(p), "sha256": h}
        if states_array.ndim == 2:
            states_array = states_array[None]
        if states_array.ndim != 3 or states_array.shape[1:] != (dy.tokens, m.d) or len(states_array) == 0:
            raise ConfigError(f"{path}: [stability] states must have shape (k, {dy.tokens}, {m.d}) or ({dy.tokens}, {m.d}), "
                              f"got {states_array.shape}")
        check_fits(f"{path}: [stability] states file {str(p)!r}", states_array, dtype)
        zero = np.argwhere(np.max(np.abs(states_array), axis=-1) == 0)
        if len(zero):
            raise ConfigError(f"{path}: [stability] states file {str(p)!r}: state {zero[0][0]} has a token of norm 0 "
                              f"(token {zero[0][1]}); equilibria live on the sphere, every token needs a direction")
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
        check_fits(f"{path}: [basins] sampler radius", b.sampler.radius, dtype)
    if b.local is not None:
        where_eq("basins", "local", b.local.eigenvector, b.local.split)
    if b.continuation is not None:
        check_fits(f"{path}: [basins] continuation values", b.continuation.values, dtype)
        if b.continuation.param == "alpha" and f.dynamics.time != "discrete":
            raise ConfigError(f"{path}: [basins] continuation param = 'alpha' needs time = 'discrete' (a flow has no step size)")
    s = f.stability
    if s.continuation is not None:
        c = s.continuation
        where_eq("stability", "continuation", c.eigenvector, c.split)
        check_fits(f"{path}: [stability] continuation start/stop", [c.start, c.stop], dtype)
    if s.clustering is not None and s.clustering.clusters > n:
        raise ConfigError(f"{path}: [stability] clustering clusters = {s.clustering.clusters} exceeds tokens = {n}")
    e = f.energy
    if (e.w is None) != (e.m is None) or (e.w is not None and len(e.w) != len(e.m)):
        raise ConfigError(f"{path}: [energy] give both w and m, one value per head")
    if e.w is not None and len(e.w) != f.model.heads:
        raise ConfigError(f"{path}: [energy] w and m have {len(e.w)} values, one per head: the model has "
                          f"{f.model.heads} head(s)")
    ms = f.metastability
    if f.dynamics.time == "continuous" and ms.t1 < ms.dt:
        raise ConfigError(f"{path}: [metastability] t1 = {ms.t1:g} is shorter than one step dt = {ms.dt:g}")
    for name in ("tokens", "betas"):  # each n (beta) is one cell: a second would replace the first's episodes
        vals = list(getattr(ms, name))
        if len(set(vals)) != len(vals):
            raise ConfigError(f"{path}: [metastability] {name} must list each value once, got {vals}")
    g = f.geometry
    if g.box > g.resolution:
        raise ConfigError(f"{path}: [geometry] box = {g.box} is larger than the image (resolution = {g.resolution})")


def read_toml(path: str | Path) -> dict:
    """The TOML dictionary of a config file (no validation); one-line errors for a missing, malformed, too large
    (more than 16 MiB) or too deeply nested file, and for anything that is not a regular file (a directory, a
    device such as /dev/zero, a FIFO), which is never read."""
    path = Path(path)
    data = read_bytes("config file", path, MAX_CONFIG_BYTES, expected="a .toml file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {one_line(e)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: malformed TOML: values nested too deeply (at most {MAX_NESTING} levels)") from None
    check_nesting(str(path), raw)
    return raw


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML run configuration (no side effects: JAX's settings are left alone)."""
    return parse_config(read_toml(path), Path(path))


