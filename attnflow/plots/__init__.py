"""Figures: matplotlib is imported only inside this package.

Importing it has no side effects: figures are built on :class:`matplotlib.figure.Figure` directly, so no backend
is chosen and no pyplot state is touched (the figures are written to files and never shown).

Every figure function writes its file through :func:`save`, which writes atomically (a unique temporary file in the
same directory, then ``os.replace``: an interrupted run leaves the previous file or none, never half a PNG), and
returns the :class:`~matplotlib.figure.Figure` it drew, closed, so that its axes, texts and artists can be inspected.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from .._files import tmp_name


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, **kw):
    """A figure and its axes, like ``plt.subplots``, without pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def figure(*, figsize=None):
    """An empty figure, without pyplot."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def write_atomic(fig, path, **savefig_kw) -> Path:
    """Write `fig` to `path` atomically: render into a new file with a unique name in the same directory (so on the
    same file system), flush it to disk, then ``os.replace`` it onto `path`. Readers see the old file or the new one,
    never a partial one; on any error (an interrupt included) the temporary file is removed and `path` is untouched.
    The format comes from the suffix of `path` (default png). Returns `path`."""
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    tmp = tmp_name(path)  # .NAME.PID.UUID.tmp: removed as stale by a resume, or by this process when interrupted
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # new and unique; the umask applies as usual
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt, **savefig_kw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def close(fig) -> None:
    """Release a figure. The figures of this package are not registered with pyplot, so there is nothing to
    release unless pyplot is in use (a notebook) and manages `fig`; pyplot is never imported here."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)


def save(fig, path):
    """Lay out a figure, write it (110 dpi) with :func:`write_atomic` and close it.

    **Returns:** the figure, for inspection (its axes, texts and artists stay readable after closing).
    """
    fig.tight_layout()
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_text():  # keep the panels' titles clear of the suptitle
        lines = sup.get_text().count("\n") + 1
        titles = [ax.title for ax in fig.axes if ax.title.get_text()] or [None]
        t = max((1.4 * (x.get_text().count("\n") + 1) * x.get_fontsize() if x is not None else 0.0) for x in titles)
        room = (1.6 * lines * sup.get_fontsize() + t + 6) / (72 * fig.get_figheight())
        fig.subplots_adjust(top=min(fig.subplotpars.top, 1 - room))
    write_atomic(fig, path, dpi=110)
    close(fig)
    return fig


def settle_time(ts, Y, *, rtol: float = 2e-3) -> float:
    """The first saved time after which every curve of `Y` stays within `rtol` x its range of its final value.

    **Arguments:** `ts` ``(s,)``; `Y` ``(s, ...)`` curves along the first axis; `rtol`.

    **Returns:** that time (``ts[-1]`` when the curves still move at the end; ``ts[0]`` when they never move).
    """
    ts = np.asarray(ts, float)
    Y = np.asarray(Y, float).reshape(len(ts), -1)
    Y = Y[:, np.all(np.isfinite(Y), axis=0)]
    if Y.size == 0 or len(ts) < 2:
        return float(ts[-1]) if len(ts) else 0.0
    span = np.max(Y, axis=0) - np.min(Y, axis=0)
    tol = rtol * np.maximum(span, max(1e-3 * float(np.max(span)), 1e-12))  # each curve on its own scale
    moving = np.any(np.abs(Y - Y[-1]) > tol, axis=1)
    if not np.any(moving):
        return float(ts[0])
    last = int(np.nonzero(moving)[0][-1]) + 1
    return float(ts[min(last, len(ts) - 1)])


def crop_time(ax, ts, Y, *, rtol: float = 2e-3, keep: float = 0.6, show=()) -> bool:
    """Crop a time axis to where the curves of `Y` change (to 1.5x their settle time), and mark the end.

    Does nothing when the change fills more than `keep` of the run. When it crops, the right edge says until
    when the curves stay flat. Times in `show` (e.g. a marked event) stay inside the window.

    **Returns:** whether the axis was cropped.
    """
    ts = np.asarray(ts, float)
    if len(ts) < 3:
        return False
    t0, t1 = float(ts[0]), float(ts[-1])
    ts_settle = settle_time(ts, Y, rtol=rtol)
    right = max([t0 + 1.5 * (ts_settle - t0), float(ts[min(2, len(ts) - 1)])] + [t0 + 1.1 * (float(t) - t0) for t in show])
    if right >= t0 + keep * (t1 - t0):
        return False
    ax.set_xlim(t0, right)
    unit = "step" if np.allclose(ts, np.round(ts)) else "t"
    ax.annotate(f"flat from {unit} {ts_settle:.4g}\nto the end, {unit} {t1:.4g} \u2192", xy=(1.0, 0.02), xycoords="axes fraction",
                ha="right", va="bottom", fontsize=7, color="0.3",
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="0.7", alpha=0.85))
    return True
