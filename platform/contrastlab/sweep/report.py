"""Report of a finished sweep, built from MLflow alone: leaderboard, best config, Optuna plots.

The sweep's state lives in MLflow (parent run tagged ``contrastlab.sweep``, one child run per
trial, the space file as an artifact of the parent), so a report needs nothing from the driver
or the Tune folder. The Optuna study is rebuilt from the child runs with the space's own
distributions: every trial's value is its last reported value of the sweep's metric, and a
trial stopped early by ASHA counts with the value it reached (as Optuna itself records it);
the leaderboard shows how many epochs each trial ran. Failed trials are kept out of the
study.

Outputs (also logged to the parent run under ``report/``): ``leaderboard.csv``,
``best_config.yaml``, ``optimization_history.png``, ``param_importances.png``,
``slice.png``, ``contour.png`` (top two parameters), ``report.md`` and ``report.html``.
"""

from __future__ import annotations

import html
import json
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contrastlab import tracking
from contrastlab.config import ConfigError
from contrastlab.sweep.space import METHOD_KEY, SearchSpace, ShootoutSpace, load_space
from contrastlab.sweep.spec import SpaceError


@dataclass
class SweepReport:
    sweep: str
    parent_run_id: str
    leaderboard: Any  # pandas.DataFrame
    best: dict[str, Any] | None
    importances: dict[str, float]
    files: dict[str, Path] = field(default_factory=dict)
    text: str = ""
    methods: Any = None  # pandas.DataFrame: a shootout's per-method table (method_table)
    front: list[dict[str, Any]] = field(default_factory=list)  # two objectives: pareto_front


def locate_sweep(uri: str, sweep: str, experiment: str | None = None) -> tuple[str, str] | None:
    """``(experiment_id, parent_run_id)`` of sweep ``sweep`` (searched in ``experiment``, else
    in every experiment), or None."""
    c = tracking.client(uri)
    if experiment is not None:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            raise ConfigError(f"--experiment: no MLflow experiment named {experiment!r} in {uri}")
        exps = [exp]
    else:
        exps = c.search_experiments()
    for exp in exps:
        parent = tracking.find_parent(uri, exp.experiment_id, sweep)
        if parent is not None:
            return exp.experiment_id, parent
    return None


def find_sweep(uri: str, sweep: str, experiment: str | None = None) -> tuple[str, str]:
    """``(experiment_id, parent_run_id)`` of sweep ``sweep``; ConfigError if absent."""
    found = locate_sweep(uri, sweep, experiment)
    if found is not None:
        return found
    raise ConfigError(
        f"no sweep named {sweep!r} in {uri}"
        + (f" (experiment {experiment!r})" if experiment else "")
        + "; sweep names are the MLflow parent runs' contrastlab.sweep tag"
    )


def _space_of(uri: str, parent_id: str, out: Path) -> SearchSpace | ShootoutSpace | None:
    """The space file logged on the parent run, loaded again (None if it no longer loads)."""
    c = tracking.client(uri)
    try:
        files = [f.path for f in c.list_artifacts(parent_id, "space") if not f.is_dir]
        if not files:
            return None
        local = c.download_artifacts(parent_id, files[0], str(out))
        return load_space(local)
    except (SpaceError, OSError) as e:
        warnings.warn(f"the sweep's space file does not load any more ({e})", stacklevel=2)
        return None


def _distributions(space: SearchSpace) -> dict[str, Any]:
    import optuna.distributions as d

    out: dict[str, Any] = {}
    for p in space.params:
        if p.dist == "categorical":
            # tuple choices (augment.crop_scale, ...) as their labels: Optuna takes scalars
            out[p.path] = d.CategoricalDistribution(p.optuna_choices)
        elif p.dist == "int":
            out[p.path] = d.IntDistribution(int(p.low), int(p.high), log=p.log, step=p.step or 1)
        else:
            out[p.path] = d.FloatDistribution(
                float(p.low), float(p.high), log=p.dist == "loguniform"
            )
    return out


def _inside(dist: Any, v: Any) -> bool:
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return v in dist.choices
    return isinstance(v, int | float) and dist.low <= v <= dist.high


def rebuild_study(trials: list[dict[str, Any]], space: SearchSpace):
    """An in-memory Optuna study holding the sweep's trials (failed ones as FAIL)."""
    import optuna

    dists = _distributions(space)
    study = optuna.create_study(direction="maximize" if space.mode == "max" else "minimize")
    for t in trials:
        values: dict[str, Any] = {}
        for p in space.params:
            if p.path in t["params"] and space.is_active(p, values):
                # MLflow gives a tuple field back as a list: the study knows its label
                values[p.path] = p.encode(t["params"][p.path])
        # a value outside the space (a space edited since the sweep) cannot enter the study
        params = {k: v for k, v in values.items() if _inside(dists[k], v)}
        ok = t["status"] != "FAILED" and t["value"] is not None and math.isfinite(t["value"])
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: dists[k] for k in params},
                value=t["value"] if ok else None,
                state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
                intermediate_values=t["curve"],
                user_attrs={"run_id": t["run_id"], "epochs": t["epochs"]},
            )
        )
    return study


def sweep_trials(uri: str, exp_id: str, parent_id: str, metric: str) -> list[dict[str, Any]]:
    """The sweep's trials in start order: run id, name, status, epochs, ``value`` (``metric`` at
    its last trained epoch), the curve of ``metric`` by epoch, params, end reason, ``method``
    and ``latest`` (every metric's last reported value, as MLflow keeps it)."""
    c = tracking.client(uri)
    out = []
    for r in tracking.child_runs(uri, exp_id, parent_id):
        hist = sorted(c.get_metric_history(r.info.run_id, metric), key=lambda m: m.step)
        curve = {m.step: m.value for m in hist if m.step > 0}
        out.append(
            {
                "run_id": r.info.run_id,
                "trial": r.info.run_name,
                "status": r.info.status,
                "start": r.info.start_time,
                "epochs": max(curve, default=0),
                "value": curve[max(curve)] if curve else None,
                "curve": curve,
                "params": {k: tracking.param_value(v) for k, v in r.data.params.items()},
                "reason": r.data.tags.get("contrastlab.end_reason", ""),
                "method": r.data.params.get(METHOD_KEY, ""),
                "latest": dict(r.data.metrics),
            }
        )
    return sorted(out, key=lambda t: t["start"])


def best_trial(trials: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The best trial of a sweep (see :func:`sweep_trials`): among the FINISHED trials with a
    finite value, the highest (``mode`` max) or lowest; the earliest started wins a tie. A
    trial stopped early by ASHA is left out: its value is from an earlier epoch, not comparable
    with final values. None when no trial finished."""
    finished = [
        t
        for t in trials
        if t["status"] == "FINISHED" and t["value"] is not None and math.isfinite(t["value"])
    ]
    if not finished:
        return None
    pick = max if mode == "max" else min
    return pick(finished, key=lambda t: t["value"])


def best_of_sweep(uri: str, exp_id: str, parent_id: str) -> dict[str, Any] | None:
    """:func:`best_trial` of the sweep whose parent run is ``parent_id``, by the metric and
    mode the sweep ran with (tags of its parent run)."""
    tags = tracking.client(uri).get_run(parent_id).data.tags
    metric = tags.get("contrastlab.metric", "knn_top1")
    return best_trial(
        sweep_trials(uri, exp_id, parent_id, metric), tags.get("contrastlab.mode", "max")
    )


# --------------------------------------------------------------------------- shootout, Pareto


def trial_seconds(uri: str, run_id: str) -> float:
    """Training seconds a trial spent: its epochs' ``epoch_time_s`` summed (one value per
    epoch: an epoch trained again after a restart counts once, as its last attempt)."""
    hist = tracking.client(uri).get_metric_history(run_id, "epoch_time_s")
    return float(sum({m.step: m.value for m in sorted(hist, key=lambda m: m.timestamp)}.values()))


def method_table(trials: list[dict[str, Any]], space: Any, uri: str) -> Any:
    """A shootout's per-method table (pandas), from the trials' MLflow runs: trials, finished,
    stopped early, failed, best and median of the metric over the trials that ran the full
    budget, compute spent (trial-seconds; GPU-seconds = trial-seconds x GPUs per trial when
    trials hold GPUs). Each trial gets its ``seconds`` (:func:`trial_seconds`) on the way."""
    import pandas as pd

    metric, res = space.metric, space.resources
    gpus = res.workers * res.gpus_per_worker
    rows = []
    for m in space.methods:
        mine = [t for t in trials if t["method"] == m]
        for t in mine:
            t.setdefault("seconds", trial_seconds(uri, t["run_id"]))
        done = [t["value"] for t in _finished(mine)]
        pick = max if space.mode == "max" else min
        secs = sum(t["seconds"] for t in mine)
        rows.append(
            {
                "method": m,
                "trials": len(mine),
                "finished": sum(t["status"] == "FINISHED" for t in mine),
                "stopped_early": sum(t["status"] == "KILLED" for t in mine),
                "failed": sum(t["status"] == "FAILED" for t in mine),
                f"best_{metric}": pick(done) if done else math.nan,
                f"median_{metric}": float(statistics.median(done)) if done else math.nan,
                "trial_seconds": secs,
                "gpu_seconds": secs * gpus if gpus else math.nan,
            }
        )
    return pd.DataFrame(rows)


def _finished(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        t
        for t in trials
        if t["status"] == "FINISHED" and t["value"] is not None and math.isfinite(t["value"])
    ]


def _plot_compute(trials: list[dict[str, Any]], space: Any, path: Path) -> None:
    """Best-so-far metric (full-budget trials) against cumulative trial-seconds, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    better = max if space.mode == "max" else min
    for m in space.methods:
        xs, ys, spent, best = [0.0], [math.nan], 0.0, None
        for t in trials:  # start order
            if t["method"] != m:
                continue
            spent += t["seconds"]
            if _finished([t]):
                best = t["value"] if best is None else better(best, t["value"])
            xs.append(spent)
            ys.append(math.nan if best is None else best)
        ax.step(xs, ys, where="post", marker="o", label=m)
    ax.set_xlabel("cumulative compute (trial-seconds)")
    ax.set_ylabel(f"best {space.metric} so far")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def pareto_front(trials: list[dict[str, Any]], objectives) -> list[dict[str, Any]]:
    """The finished trials no other finished trial dominates, best first by the first
    objective. A trial's objective values are its runs' last reported values (``latest``);
    ``objectives`` is ``((metric, mode), ...)``. ``a`` dominates ``b`` when it is no worse in
    every objective and better in one."""
    sign = [1.0 if mode == "max" else -1.0 for _, mode in objectives]
    points = []
    for t in trials:
        if t["status"] != "FINISHED":
            continue
        vals = [t["latest"].get(m) for m, _ in objectives]
        if all(v is not None and math.isfinite(v) for v in vals):
            points.append((t, [s * v for s, v in zip(sign, vals, strict=True)]))

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and a != b

    front = [(t, p) for t, p in points if not any(dominates(q, p) for _, q in points)]
    return [t for t, p in sorted(front, key=lambda tp: [-v for v in tp[1]])]


def objectives_of(uri: str, parent_id: str) -> tuple[tuple[str, str], ...]:
    """The ``(metric, mode)`` objectives a sweep ran with (its parent run's tags)."""
    tags = tracking.client(uri).get_run(parent_id).data.tags
    saved = json.loads(tags.get("contrastlab.objectives") or "[]")
    if saved:
        return tuple((m, mode) for m, mode in saved)
    return ((tags.get("contrastlab.metric", "knn_top1"), tags.get("contrastlab.mode", "max")),)


def front_of_sweep(uri: str, exp_id: str, parent_id: str) -> list[dict[str, Any]]:
    """:func:`pareto_front` of a sweep, by the objectives it ran with."""
    objectives = objectives_of(uri, parent_id)
    return pareto_front(sweep_trials(uri, exp_id, parent_id, objectives[0][0]), objectives)


def _plot_pareto(trials, front, objectives, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (mx, _), (my, _) = objectives[:2]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    pts = [t for t in trials if t["latest"].get(mx) is not None and t["latest"].get(my) is not None]
    ax.scatter(
        [t["latest"][mx] for t in pts],
        [t["latest"][my] for t in pts],
        c="0.6",
        label="trials",
    )
    ax.plot(
        [t["latest"][mx] for t in front],
        [t["latest"][my] for t in front],
        "o-",
        color="tab:red",
        label="Pareto front",
    )
    for i, t in enumerate(front):
        ax.annotate(
            str(i), (t["latest"][mx], t["latest"][my]), textcoords="offset points", xytext=(4, 4)
        )
    ax.set_xlabel(mx)
    ax.set_ylabel(my)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot(fn, path: Path, notes: list[str], **kw) -> bool:
    """Save one Optuna matplotlib plot; a plot that cannot be drawn becomes a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ax = fn(**kw)
        fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
        fig.set_size_inches(max(fig.get_size_inches()[0], 6.4), max(fig.get_size_inches()[1], 4.2))
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close("all")
        return True
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        plt.close("all")
        notes.append(f"{path.name}: not drawn ({e})")
        return False


def sweep_report(
    sweep: str,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    out_dir: str | Path | None = None,
    log_to_mlflow: bool = True,
    top: int = 10,
) -> SweepReport:
    """Build the report of sweep ``sweep`` (see the module docstring)."""
    import pandas as pd

    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    exp_id, parent_id = find_sweep(uri, sweep, experiment)
    c = tracking.client(uri)
    tags = c.get_run(parent_id).data.tags
    if tags.get(tracking.KIND_TAG) == "ablation":
        raise ConfigError(
            f"{sweep!r} is an ablation; its tables and plots are on its parent run under "
            "analysis/ (contrastlab ablate writes them)"
        )
    out = Path(out_dir or Path("reports") / sweep)
    out.mkdir(parents=True, exist_ok=True)
    space = _space_of(uri, parent_id, out)
    if space is None:
        raise ConfigError(
            f"sweep {sweep!r}: its search space file (artifact space/ of run {parent_id}) is "
            "missing or no longer valid, so the searched parameters are unknown"
        )
    metric, mode = space.metric, space.mode
    trials = sweep_trials(uri, exp_id, parent_id, metric)
    if not trials:
        raise ConfigError(f"sweep {sweep!r} has no trial runs in MLflow")
    notes: list[str] = []

    rows = [
        {
            "trial": t["trial"],
            "status": t["status"],
            "epochs": t["epochs"],
            metric: t["value"],
            **{m: t["latest"].get(m) for m, _ in space.objectives[1:]},
            **{p: t["params"].get(p) for p in space.param_paths},
            "run_id": t["run_id"],
        }
        for t in trials
    ]
    board = pd.DataFrame(rows)
    ranked = board.dropna(subset=[metric]).sort_values(metric, ascending=mode == "min")
    board = pd.concat([ranked, board[board[metric].isna()]]).reset_index(drop=True)
    board.insert(0, "rank", range(1, len(board) + 1))
    files = {"leaderboard": out / "leaderboard.csv"}
    board.to_csv(files["leaderboard"], index=False)

    bt = best_trial(trials, mode)
    best = None
    if bt is not None:
        best = {"run_id": bt["run_id"], "trial": bt["trial"], metric: bt["value"]}
        cfg_path = c.download_artifacts(bt["run_id"], "config.yaml", str(out))
        files["best_config"] = out / "best_config.yaml"
        Path(cfg_path).replace(files["best_config"])
    else:
        notes.append("no trial finished its full budget: no best config")

    importances: dict[str, float] = {}
    methods = None
    if isinstance(space, ShootoutSpace):
        # Optuna's plots are of one study; a shootout has one per method
        methods = method_table(trials, space, uri)
        files["methods"] = out / "methods.csv"
        methods.to_csv(files["methods"], index=False)
        files["compute"] = out / "compute.png"
        _plot_compute(trials, space, files["compute"])
    else:
        importances = _optuna_plots(trials, space, out, files, notes)
    front: list[dict[str, Any]] = []
    if len(space.objectives) > 1:
        front = pareto_front(trials, space.objectives)
        files["pareto"] = out / "pareto.png"
        _plot_pareto(trials, front, space.objectives, files["pareto"])

    text = _markdown(sweep, parent_id, space, board.head(top), best, importances, trials, notes)
    extra = _extra_markdown(sweep, space, methods, front)
    text += "\n" + extra if extra else ""
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(text)
    files["html"] = out / "report.html"
    files["html"].write_text(_html(sweep, text, board.head(top), files))
    if log_to_mlflow:
        for f in files.values():
            c.log_artifact(parent_id, str(f), "report")
    return SweepReport(sweep, parent_id, board, best, importances, files, text, methods, front)


def _optuna_plots(trials, space: SearchSpace, out: Path, files: dict, notes: list[str]):
    """Optuna's plots of the rebuilt study into ``files``; the fANOVA importances."""
    import optuna

    study = rebuild_study(trials, space)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    importances: dict[str, float] = {}
    vis = optuna.visualization.matplotlib
    if len(complete) >= 2:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
                )
        except (ValueError, RuntimeError) as e:
            notes.append(f"parameter importance not computed ({e})")
        files["history"] = out / "optimization_history.png"
        if not _plot(vis.plot_optimization_history, files["history"], notes, study=study):
            files.pop("history")
        if importances:
            files["importances"] = out / "param_importances.png"
            if not _plot(
                vis.plot_param_importances,
                files["importances"],
                notes,
                study=study,
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            ):
                files.pop("importances")
        top_params = list(importances)[:4] or list(space.param_paths)[:4]
        files["slice"] = out / "slice.png"
        if not _plot(vis.plot_slice, files["slice"], notes, study=study, params=top_params):
            files.pop("slice")
        if len(top_params) >= 2:
            files["contour"] = out / "contour.png"
            if not _plot(
                vis.plot_contour, files["contour"], notes, study=study, params=top_params[:2]
            ):
                files.pop("contour")
    else:
        notes.append("fewer than 2 completed trials: no Optuna plots")
    return importances


def _markdown(sweep, parent_id, space, board, best, importances, trials, notes) -> str:
    metric = space.metric
    n_failed = sum(t["status"] == "FAILED" for t in trials)
    n_stopped = sum(t["status"] == "KILLED" for t in trials)
    lines = [
        f"# Sweep {sweep}",
        "",
        f"Method `{space.method}`, space `{space.path.name}`, {len(trials)} trials "
        f"({n_stopped} stopped early, {n_failed} failed), {metric} ({space.mode}), "
        f"budget {space.epochs} epochs. MLflow parent run `{parent_id}`.",
        "",
    ]
    if best is not None:
        lines += [
            f"**Best:** trial `{best['trial']}` (run `{best['run_id']}`), "
            f"{metric} = {best[metric]:.4g}. Reproduce it with "
            f"`contrastlab reproduce --run-id {best['run_id']}`.",
            "",
        ]
    lines += ["## Leaderboard", "", _md_table(board), ""]
    if importances:
        lines += ["## Parameter importance (fANOVA)", ""]
        lines += [f"- `{k}`: {v:.3f}" for k, v in importances.items()] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _extra_markdown(sweep: str, space, methods, front: list[dict[str, Any]]) -> str:
    """The method table (a shootout) and the Pareto front (two objectives), as markdown."""
    lines: list[str] = []
    if methods is not None:
        res = space.resources
        lines += [
            "## Methods",
            "",
            f"{space.trials} trials per method, {space.epochs} epochs each, "
            f"{res.workers} worker(s) x {res.gpus_per_worker:g} GPU per trial. Best and median "
            f"over trials that ran the full budget; compute counts every trial's training epochs.",
            "",
            _md_table(methods),
            "",
        ]
    if front:
        names = [m for m, _ in space.objectives]
        lines += [
            f"## Pareto front ({' vs '.join(f'{m} ({mode})' for m, mode in space.objectives)})",
            "",
            "| index | trial | " + " | ".join(names) + " | reproduce |",
            "|---|---|" + "---|" * len(names) + "---|",
        ]
        for i, t in enumerate(front):
            vals = " | ".join(_fmt(t["latest"][m]) for m in names)
            lines.append(
                f"| {i} | {t['trial']} | {vals} | `contrastlab reproduce --best-of {sweep} "
                f"--front-index {i}` (or `--run-id {t['run_id']}`) |"
            )
        lines.append("")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _md_table(df) -> str:
    cols = [c for c in df.columns if c != "run_id"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.to_dict("records"):
        out.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(out)


def _html(sweep: str, markdown: str, board, files: dict[str, Path]) -> str:
    cols = [c for c in board.columns if c != "run_id"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in cols) + "</tr>"
        for r in board.to_dict("records")
    )
    imgs = "".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(k)}" width="640">'
        f"<figcaption>{html.escape(k)}</figcaption></figure>"
        for k, p in files.items()
        if p.suffix == ".png"
    )
    intro = html.escape(markdown.split("## Leaderboard")[0]).replace("\n\n", "<br><br>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Sweep {html.escape(sweep)}"
        "</title><style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}</style>"
        f"</head><body>{intro}<h2>Leaderboard</h2><table><tr>{head}</tr>{body}</table>"
        f"{imgs}<pre>{html.escape(json.dumps({k: str(v) for k, v in files.items()}, indent=1))}"
        "</pre></body></html>"
    )


__all__ = [
    "SweepReport",
    "front_of_sweep",
    "method_table",
    "objectives_of",
    "pareto_front",
    "trial_seconds",
    "best_of_sweep",
    "best_trial",
    "find_sweep",
    "locate_sweep",
    "rebuild_study",
    "sweep_report",
    "sweep_trials",
]
