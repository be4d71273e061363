"""The documentation is self-contained and its API paths work.

- Every dotted path ``attnflow.xxx`` named in README.md, benchmarks/README.md and docs/*.md resolves: the longest
  importable prefix is imported and the rest are attributes. A path that names a module must be the module's real
  import path (``attnflow.stability`` is refused: ``import attnflow.stability`` fails even though
  ``attnflow.stability`` is an attribute).
- No file of the project points outside the repository (notes kept next to it, absolute machine paths).
- Every "docs/model.md section N" citation names a section that exists.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Split so that this file does not match its own patterns.
FORBIDDEN = ["../" + "shared", "MODEL" + ".md", "GPU_" + "NOTES", "/work/" + "main", "/work/" + "shared"]

PATH_RE = re.compile(r"(?<![\w./-])attnflow(?:\.[A-Za-z_]\w*)+(?![\w-])")


def dotted_paths(text: str) -> set[str]:
    """Every ``attnflow.a.b`` in a text; a trailing sentence full stop is not part of the path."""
    return set(PATH_RE.findall(text))


def resolve(path: str):
    """Import the longest importable prefix of `path`, then follow attributes. Raises on failure, and when a
    module is reached through an attribute under a name that is not its import path."""
    parts = path.split(".")
    obj, i = None, len(parts)
    while i > 0:
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError as e:
            if e.name is None or not ".".join(parts[:i]).startswith(e.name):
                raise  # an import error inside an existing module is a real failure
            i -= 1
    if obj is None:
        raise ModuleNotFoundError(path)
    for k in range(i, len(parts)):
        if not hasattr(obj, parts[k]):
            raise AttributeError(f"{'.'.join(parts[:k])} has no attribute {parts[k]!r} (from {path})")
        obj = getattr(obj, parts[k])
        here = ".".join(parts[: k + 1])
        if isinstance(obj, types.ModuleType) and obj.__name__ != here:
            raise ImportError(f"{here} is the module {obj.__name__}: name it by its import path (`import {here}` fails)")
    return obj


def _named_paths():
    out = []
    for doc in DOCS:
        if doc.exists():
            out += [(doc.relative_to(ROOT).as_posix(), p) for p in sorted(dotted_paths(doc.read_text()))]
    return out


NAMED = _named_paths()


def test_docs_name_api_paths():
    assert len(NAMED) >= 20, "the README's API table should name the public modules"


@pytest.mark.parametrize("doc, path", NAMED, ids=[f"{d}:{p}" for d, p in NAMED])
def test_named_path_resolves(doc, path):
    resolve(path)


def test_resolver_refuses_wrong_paths():
    """The resolver must be able to fail: an attribute alias of a module, a missing module and a missing name."""
    assert dotted_paths("see `attnflow.analysis.stability`. and attnflow.egg-info") == {"attnflow.analysis.stability"}
    resolve("attnflow.analysis.stability.analyse")
    with pytest.raises(ImportError):
        resolve("attnflow.stability")  # an attribute of attnflow, but not importable under that name
    with pytest.raises((ImportError, AttributeError)):
        resolve("attnflow.no_such_module.thing")
    with pytest.raises(AttributeError):
        resolve("attnflow.analysis.stability.no_such_function")


def api_table_rows(readme: str):
    """(modules, names) per row of the README's API table: the `attnflow.x` paths of the first cell and the
    backticked identifiers of the second."""
    section = readme.split("## The API", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) < 4 or "attnflow." not in cells[1]:
            continue
        mods = re.findall(r"`(attnflow(?:\.\w+)+)`", cells[1])
        names = [t for t in re.findall(r"`([^`]+)`", "|".join(cells[2:])) if re.fullmatch(r"[A-Za-z_]\w*", t)]
        rows.append((mods, names))
    return rows


def test_api_table_names_live_in_their_row_modules():
    rows = api_table_rows((ROOT / "README.md").read_text())
    assert len(rows) >= 8
    bad = []
    for mods, names in rows:
        objs = [resolve(m) for m in mods]
        bad += [f"{name} (row {', '.join(mods)})" for name in names if not any(hasattr(o, name) for o in objs)]
    assert not bad, "names in the API table that its modules do not have: " + ", ".join(bad)


def _project_files() -> list[Path]:
    """Tracked files and untracked files git does not ignore; without git, a walk that skips the usual outputs."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        files = [ROOT / f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis"}
        files = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)]
    return [f for f in files if f.is_file()]


def test_nothing_points_outside_the_repository():
    bad = []
    for f in _project_files():
        data = f.read_bytes()
        for pat in FORBIDDEN:
            if pat.encode() in data:
                bad.append(f"{f.relative_to(ROOT)}: {pat}")
    assert not bad, "files point outside the repository:\n" + "\n".join(bad)


def test_links_stay_inside_the_repository():
    """Every Markdown link of the docs points to a file of the repository (no web links, no broken paths)."""
    bad = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            path = target.split("#", 1)[0]
            if re.match(r"[a-z]+:", target):
                bad.append(f"{doc.relative_to(ROOT)}: {target} (outside the repository)")
            elif path and not (doc.parent / path).exists():
                bad.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
    assert not bad, "\n".join(bad)


def test_model_md_citations_name_existing_sections():
    text = (ROOT / "docs" / "model.md").read_text()
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", text, flags=re.M)}
    assert sections >= set(range(1, 11)), sections
    cite = re.compile(r"docs/model\.md`?(?:'s)?\s+sections?\s+(\d+)(?:\s*(?:-|,|and)\s*(\d+))*")
    bad = []
    for f in _project_files():
        if f.suffix not in (".py", ".md", ".ipynb", ".toml"):
            continue
        for m in cite.finditer(f.read_text(errors="replace")):
            nums = [int(x) for x in re.findall(r"\d+", m.group(0))]
            bad += [f"{f.relative_to(ROOT)}: {m.group(0)!r}" for k in nums if k not in sections]
    assert not bad, "citations of missing sections:\n" + "\n".join(bad)
