"""Every public module, class, function, method and property of attnflow has a docstring of its own.

Dataclasses, equinox Modules and equinox Enumerations get an automatic ``__doc__`` (the signature
``Name(field: type, ...)``, or a list of the entries); those do not count. Public names re-exported from private
modules (``attnflow.analysis.energy._trace``) are checked where they are exported.
"""

import dataclasses
import importlib
import inspect
import pkgutil
import re

import equinox as eqx
import pytest

import attnflow


def _generated(cls, doc: str) -> bool:
    """Whether `doc` is what dataclasses / equinox wrote for `cls`, not what a person wrote."""
    doc = doc.strip()
    if "\n" not in doc and re.fullmatch(rf"{re.escape(cls.__name__)}\(.*\)", doc):  # dataclass / eqx.Module signature
        return True
    return issubclass(cls, eqx.Enumeration) and doc.startswith("An\n[enumeration](")


def own_doc(obj) -> str:
    """The docstring written for `obj` itself ("" when missing or generated)."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__") or ""
        return "" if _generated(obj, doc) else doc.strip()
    return (inspect.getdoc(obj) or "").strip() if not isinstance(obj, property) else (obj.__doc__ or "").strip()


def undocumented(objects) -> list[str]:
    """Names of the (qualified name, object) pairs whose object, or one of whose public methods and properties,
    has no docstring of its own."""
    missing = []
    for qual, obj in objects:
        if not own_doc(obj):
            missing.append(qual)
        if inspect.isclass(obj):
            for mn, mo in vars(obj).items():
                if mn.startswith("_"):
                    continue
                if isinstance(mo, (staticmethod, classmethod)):
                    mo = mo.__func__
                if (inspect.isfunction(mo) or isinstance(mo, property)) and not own_doc(mo):
                    missing.append(f"{qual}.{mn}")
    return missing


def public_objects():
    """(qualified name, object) for every public module of attnflow and every public class and function defined
    in attnflow that a public module exposes; each object once, under the name of the module that defines it."""
    seen, out = set(), []
    for m in pkgutil.walk_packages(attnflow.__path__, "attnflow."):
        if any(part.startswith("_") for part in m.name.split(".")[1:]):
            continue
        mod = importlib.import_module(m.name)
        out.append((m.name, mod))
        for name, obj in vars(mod).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not str(getattr(obj, "__module__", "")).startswith("attnflow") or id(obj) in seen:
                continue
            seen.add(id(obj))
            out.append((f"{obj.__module__}.{obj.__qualname__}", obj))
    return out


def test_every_public_name_has_a_docstring():
    missing = undocumented(public_objects())
    assert not missing, missing


def test_detects_generated_docstrings():
    """The check must fail on undocumented Modules, dataclasses, Enumerations, methods and properties."""

    class Bare(eqx.Module):
        x: int

        def method(self):
            return self.x

        @property
        def prop(self):
            return self.x

    @dataclasses.dataclass
    class BareData:
        a: int

    class BareEnum(eqx.Enumeration):
        a = "first"

    class Documented(eqx.Module):
        """Has a docstring."""

        x: int

        def method(self):
            """Documented."""
            return self.x

    class Subclass(Documented):
        y: int = 0

    assert Bare.__doc__ and BareData.__doc__ and BareEnum.__doc__  # Python/equinox did fill them in
    got = undocumented([("Bare", Bare), ("BareData", BareData), ("BareEnum", BareEnum), ("Documented", Documented),
                        ("Subclass", Subclass)])
    assert got == ["Bare", "Bare.method", "Bare.prop", "BareData", "BareEnum", "Subclass"]


@pytest.mark.parametrize("doc", ["Heads(Q, K)", "A short line."])
def test_generated_form_is_matched_by_name(doc):
    class Heads:
        pass

    assert _generated(Heads, doc) == doc.startswith("Heads(")
