"""Training curves of one or several runs: loss, lr, kNN top-1, pretext top-1, effective rank and embedding std
against step.

``python -m experiments.plot CKPT_DIR [CKPT_DIR ...] --out curves.png`` draws them; ``main_moco.py`` calls
:func:`write_curves` at each checkpoint (``CKPT_DIR/curves.png``).

Each run directory's ``steps.jsonl`` (per-print-step records, ``RunLogger.log_step``) and ``log.jsonl``
(per-epoch and other records, ``RunLogger.log``) hold one JSON record per line; both are read. Every record that
carries a numeric ``step`` adds a point to each series whose key it has (:data:`SERIES_KEYS`); other keys are
ignored. Per-epoch
summaries (records with ``time_s``, as ``main_moco.py`` writes at each epoch's end, or ``"kind": "epoch"``) are
used for a series only when no finer record has that key, so a mean over the epoch is not drawn into a per-step
curve. A step logged twice keeps its last value. Lines that are not valid JSON (a line being written while we read)
are skipped with a warning. Runs are labelled by ``name`` in their ``run.json`` when present, else by the directory.

Needs matplotlib (the ``viz`` extra); :func:`write_curves` returns False without it, so training can call it at
every checkpoint unconditionally.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

from .logging import read_jsonl

SERIES_KEYS = ("loss", "lr", "knn_top1", "acc1", "acc1_batch", "emb_rank", "feat_rank", "emb_std", "emb_std_ref")

# (title, y label, solid series, dashed series, legend names of solid / dashed, log-scale y when the values span a
# decade). Linear lr: a cosine schedule ends at 0 and reads best linear; log std: a collapse takes it down by decades.
# kNN top-1 has a panel of its own: drawn beside top-5 (~40 points higher) its few-point rise looked flat; top-5
# stays in the logs. The online kNN at step 0 is the network before training (random init unless --restart): a
# dotted line marks it.
PANELS: list[tuple[str, str, str, str | None, tuple[str, str], bool]] = [
    ("training loss", "loss (nats)", "loss", None, ("", ""), False),
    ("learning rate", "lr", "lr", None, ("", ""), False),
    ("online kNN top-1", "kNN top-1 (%)", "knn_top1", None, ("", ""), False),
    ("pretext top-1", "top-1 (%)", "acc1", "acc1_batch", ("among all keys (queue)", "among the batch's keys"), False),
    ("effective rank (RankMe)", "effective rank", "emb_rank", "feat_rank", ("embeddings", "backbone features"), False),
    ("embedding std (L2-normalised rows)", "mean per-dim std", "emb_std", None, ("", ""), True),
]


@dataclass
class Run:
    """One run's curves: ``series[key] = (steps, values)``, both sorted by step."""

    name: str
    path: str
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)


def _is_epoch_summary(record: dict) -> bool:
    return record.get("kind") == "epoch" or "time_s" in record


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_records(path: str) -> list[dict]:
    """The JSON objects of a JSON-lines file; malformed lines (and non-objects) are skipped with a warning."""
    return read_jsonl(path)


def series_from_records(records: list[dict], keys: tuple[str, ...] = SERIES_KEYS) -> dict[str, tuple[list, list]]:
    """``{key: (steps, values)}`` from records (see the module docstring for the rules); keys without data absent."""
    fine: dict[str, dict[float, float]] = {}
    coarse: dict[str, dict[float, float]] = {}
    for rec in records:
        step = _number(rec.get("step"))
        if step is None:
            continue
        target = coarse if _is_epoch_summary(rec) else fine
        for key in keys:
            value = _number(rec.get(key))
            if value is not None:
                target.setdefault(key, {})[step] = value  # later records win (re-logged after a resume)
    out = {}
    for key in keys:
        points = fine.get(key) or coarse.get(key)
        if points:
            steps = sorted(points)
            out[key] = (steps, [points[s] for s in steps])
    return out


def run_name(ckpt_dir: str) -> str:
    """``name`` from the last line of ``run.json`` that has one (top level or in its args), else the dir name."""
    name = None
    path = os.path.join(ckpt_dir, "run.json")
    if os.path.exists(path):
        for rec in read_records(path):
            args = rec.get("args") if isinstance(rec.get("args"), dict) else {}
            name = rec.get("name") or args.get("name") or name
    return str(name) if name else os.path.basename(os.path.normpath(ckpt_dir)) or ckpt_dir


LOG_FILES = ("steps.jsonl", "log.jsonl")  # RunLogger.log_step's per-print-step records, RunLogger.log's


def load_run(ckpt_dir: str) -> Run:
    """Read ``ckpt_dir/steps.jsonl`` and ``ckpt_dir/log.jsonl`` (neither there: a run with no series, a warning)."""
    paths = [os.path.join(ckpt_dir, f) for f in LOG_FILES if os.path.exists(os.path.join(ckpt_dir, f))]
    if not paths:
        warnings.warn(f"no {' or '.join(LOG_FILES)} in {ckpt_dir}; run skipped", stacklevel=2)
        return Run(run_name(ckpt_dir), ckpt_dir)
    records = [rec for path in paths for rec in read_records(path)]
    return Run(run_name(ckpt_dir), ckpt_dir, series_from_records(records))


def _unique_labels(runs: list[Run]) -> list[str]:
    """Run names, with the parent directory prepended where two runs share one."""
    names = [r.name for r in runs]
    out = []
    for r in runs:
        if names.count(r.name) > 1:
            parent = os.path.basename(os.path.dirname(os.path.normpath(r.path)))
            out.append(f"{parent}/{r.name}")
        else:
            out.append(r.name)
    return out


def render(runs: list[Run], out_path: str, title: str | None = None) -> bool:
    """Draw the panels that have data for at least one run into ``out_path`` (PNG). False when nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = [p for p in PANELS if any(p[2] in r.series or (p[3] and p[3] in r.series) for r in runs)]
    if not panels:
        return False
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(6.4 * ncols, 3.6 * nrows), layout="constrained")  # no pyplot: no global state
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    labels = _unique_labels(runs)
    for i, (ptitle, ylabel, solid, dashed, styles, logy) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        extra = []  # legend entries for line styles (shared by all runs)
        for run, color, label in zip(runs, colors, labels):
            if solid in run.series:
                steps, values = run.series[solid]
                ax.plot(steps, values, color=color, label=label, lw=1.5, marker="o" if len(steps) < 30 else None,
                        ms=3)
            if dashed and dashed in run.series:
                steps, values = run.series[dashed]
                ax.plot(steps, values, color=color, ls="--", lw=1.2, alpha=0.8,
                        marker="o" if len(steps) < 30 else None, ms=3,
                        label=None if solid in run.series else f"{label} ({dashed})")
            if solid == "knn_top1" and run.series.get("knn_top1", ([None],))[0][0] == 0:
                ax.axhline(run.series["knn_top1"][1][0], color=color, ls=":", lw=1.2)
                extra = [Line2D([], [], color="gray", ls=":", label="step 0: before training")]
            if solid == "emb_std" and "emb_std_ref" in run.series:
                ax.axhline(run.series["emb_std_ref"][1][-1], color=color, ls=":", lw=1.2)
                if not extra:
                    extra = [Line2D([], [], color="gray", ls=":", label="1/sqrt(d): isotropic")]
        if dashed and any(dashed in r.series for r in runs):
            extra = [Line2D([], [], color="gray", ls="-", label=styles[0]),
                     Line2D([], [], color="gray", ls="--", label=styles[1])]
        if logy and _spans_a_decade(runs, solid):
            ax.set_yscale("log")
            ylabel += " (log scale)"
        ax.set_title(ptitle)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + extra, fontsize="small")
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp.png"  # written then renamed: a viewer never sees half a PNG
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out_path)
    return True


def _spans_a_decade(runs: list[Run], key: str) -> bool:
    """Log scale only pays when the values are positive and span 10x or more (a collapse: several decades)."""
    values = [v for r in runs if key in r.series for v in r.series[key][1]]
    return bool(values) and min(values) > 0 and max(values) >= 10 * min(values)


def write_curves(ckpt_dir_or_dirs: str | list[str], out_path: str, title: str | None = None) -> bool:
    """Draw the curves of one run dir (or several, overlaid) into ``out_path``.

    Returns True when a PNG was written; False when matplotlib is not installed or no log has plottable data.
    Malformed log lines are skipped with a warning, never raised.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    dirs = [ckpt_dir_or_dirs] if isinstance(ckpt_dir_or_dirs, (str, os.PathLike)) else list(ckpt_dir_or_dirs)
    runs = [load_run(str(d)) for d in dirs]
    return render([r for r in runs if r.series], out_path, title)
