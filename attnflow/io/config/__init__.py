"""TOML run configuration -> model, dynamics and command options. One declarative schema; all validation here.

The package is split by concept:

- :mod:`.schema`: the typed records (dataclasses, one per TOML table) made of :func:`key` entries, and their
  documentation: :func:`reference` renders the schema as the documented TOML (``python -m attnflow.io.config``
  prints it), :func:`describe` one table for the ``--help`` texts of the commands.
- :mod:`.validate`: checking one value against its annotation and constraints (strict types: no ``"false"`` for a
  bool, no ``10.7`` or ``true`` for an integer; ranges; "did you mean" for unknown tables and keys), numbers that
  do not fit the chosen dtype, and safe file reading (regular files of bounded size only). The same checks serve
  the ``config.json`` of Hugging Face checkpoints (:mod:`attnflow.io.hf`).
- :mod:`.run`: :class:`RunConfig` (the validated configuration, its model, initial states and identity),
  :func:`parse_config`, :func:`load_config` and :func:`read_toml`.

Every problem raises :class:`ConfigError` with one line that names the file, the table, the key and what was
expected; the CLI prints it and exits with status 2.
"""

from .run import RunConfig, load_config, parse_config, read_toml
from .schema import (
    INPUT_KEYS, INT32_MAX, SEED_MAX, SINKHORN_ITERS_MAX, STEPS_MAX, TABLES, BasinsContinuationTable, BasinsTable,
    ClusteringTable, ConfigFile, DynamicsTable, EnergyTable, GeometryTable, LocalTable, Matrix, MetastabilityTable, ModelTable, SamplerTable,
    StabilityContinuationTable, StabilityTable, describe, key, keys_of, reference,
)
from .validate import (
    MAX_CONFIG_BYTES, MAX_INPUT_BYTES, MAX_NESTING, ConfigError, check_fits, load_npy, parse_table, read_bytes,
    real_array,
)

__all__ = [
    "INPUT_KEYS", "INT32_MAX", "MAX_CONFIG_BYTES", "MAX_INPUT_BYTES", "MAX_NESTING", "SEED_MAX", "SINKHORN_ITERS_MAX",
    "STEPS_MAX", "TABLES", "BasinsContinuationTable", "BasinsTable", "ClusteringTable", "ConfigError", "ConfigFile",
    "DynamicsTable", "EnergyTable", "GeometryTable", "LocalTable", "Matrix", "MetastabilityTable", "ModelTable", "RunConfig", "SamplerTable",
    "StabilityContinuationTable", "StabilityTable", "check_fits", "describe", "key", "keys_of", "load_config",
    "load_npy", "parse_config", "parse_table", "read_bytes", "read_toml", "real_array", "reference",
]
