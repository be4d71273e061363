"""Every public module, class, function and method of attnflow has a docstring (issue 8)."""

import importlib
import inspect
import pkgutil

import attnflow


def test_every_public_name_has_a_docstring():
    missing = []
    for m in pkgutil.walk_packages(attnflow.__path__, "attnflow."):
        if any(part.startswith("_") for part in m.name.split(".")[1:]):
            continue
        mod = importlib.import_module(m.name)
        if not (mod.__doc__ or "").strip():
            missing.append(m.name)
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                if not (obj.__doc__ or "").strip():
                    missing.append(f"{m.name}.{name}")
                if inspect.isclass(obj):
                    for mn, mo in vars(obj).items():
                        if not mn.startswith("_") and inspect.isfunction(mo) and not (mo.__doc__ or "").strip():
                            missing.append(f"{m.name}.{name}.{mn}")
    assert not missing, missing
