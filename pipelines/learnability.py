"""Learnability table: every method on every task of ``contrastlab.data.tasks``, defaults vs
the task's recipe, next to a naive SimCLR loop and kNN on raw pixels.

    # CI: one method, one task, 1 epoch, in under a minute
    python pipelines/learnability.py --smoke-test --out /tmp/learnability-smoke
    # the table (resumable: rerun the same line to fill what is missing)
    python pipelines/learnability.py --epochs 30 --table docs/learnability.md
    python pipelines/learnability.py --methods simclr moco --tasks colour position --epochs 30
    # the table only, from the results already there (and a sweep's best runs, if any)
    python pipelines/learnability.py --table-only --sweep-results sweeps.json

Each task (see ``contrastlab.data.tasks.TASKS``: a nuisance per task, a "tune" or "report"
role) is written as Parquet shards under ``OUT/data/<task>/`` and every run trains on them
through the platform's ``contrastlab.train.train``, exactly as ``contrastlab train --set
data.dataset=parquet --set data.root=OUT/data/<task>/train --set
data.test_root=OUT/data/<task>/test --set data.image_size=32`` plus the run's overrides would:

* ``defaults``: the method's defaults plus the small-data settings of
  each method config's ``small_data``;
* ``recipe``: the same plus the task's augmentation recipe, :data:`RECIPES` (or
  ``--recipes FILE``, a YAML mapping ``task: [override, ...]`` that replaces those tasks').

Every run uses the same kNN protocol (:data:`KNN`), ``--epochs`` epochs and seed. Per run the
results keep the random-init encoder's kNN (epoch 0), the last and the best epoch's, the
raw-pixel kNN and the wall time, in ``OUT/results.json`` (and ``.csv``); a run already there
(same task, method, variant, epochs, seeds and overrides) is skipped, and an interrupted
one continues from its last checkpoint, so a long table fills across invocations. The
markdown table goes to ``--table`` (default ``OUT/learnability.md``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from contrastlab.config import METHOD_CONFIGS, ConfigError, apply_overrides, make_config
from contrastlab.data import load_dataset
from contrastlab.data.tasks import KNN, TASKS, TEST_SIZE, get_task, raw_pixel_knn, write_task
from contrastlab.methods import METHODS
from contrastlab.naive import naive_simclr
from contrastlab.rundir import RunPlace
from contrastlab.train import train

# Digits are not mirror-symmetric (a mirrored 2 is no 2) and a blurred 8x8 upscale loses its
# strokes: no flip and no blur in any recipe.
_DIGIT_SAFE = ("augment.flip_p=0", "augment.blur_p=0")
# Colour as a nuisance: the views of one image get different channel orders and gains, so
# colour stops telling images apart (the naive loop's augmentation).
_COLOUR = ("augment.channel_shuffle_p=1", "augment.channel_gain=[0.6,1.4]")

# Each task's augmentation recipe, as `--set` overrides: one place, data only.
# channel_shuffle_p, channel_gain and invert_p are new augmentation fields; a recipe that
# names a field this checkout lacks fails before anything trains, naming the key.
RECIPES: dict[str, tuple[str, ...]] = {
    "colour": (*_DIGIT_SAFE, "augment.crop_scale=[0.3,1.0]", *_COLOUR),
    # zoom-in crops as small as a tenth of the canvas reach a 10 px digit
    "position": (*_DIGIT_SAFE, "augment.crop_scale=[0.1,1.0]"),
    # the digit is darker or brighter than its crop: inversion maps one onto the other
    "texture": (*_DIGIT_SAFE, "augment.crop_scale=[0.3,1.0]", *_COLOUR, "augment.invert_p=0.5"),
    "colour_position": (*_DIGIT_SAFE, "augment.crop_scale=[0.1,1.0]", *_COLOUR),
}

VARIANTS = ("defaults", "recipe")
NAIVE = "naive_simclr"
RAW = "raw_pixels"
BELOW_INIT = "▼"  # the trained encoder's kNN ended below its random init's
NOT_ABOVE_PIXELS = "°"  # it ended at or below kNN on raw pixels

SMOKE = {"methods": ["simclr"], "tasks": ["position"], "epochs": 1}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--methods",
        nargs="*",
        default=list(METHODS),
        help="registered methods (none: only the naive loop and raw pixels)",
    )
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help="learnability tasks")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--epochs", type=int, default=30, help="epochs of every platform run")
    p.add_argument(
        "--image-size",
        type=int,
        default=32,
        help="data.image_size of every run, naive loop and raw pixels (the tasks are 32 px; "
        "16 makes a CPU table about 4x cheaper)",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for every platform run of both variants, e.g. model.width=16 "
        "(recorded with each run)",
    )
    p.add_argument(
        "--naive-epochs", type=int, help="epochs of the naive loop (default: --epochs; 0: skip)"
    )
    p.add_argument("--seed", type=int, default=0, help="train.seed of every run")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the tasks' nuisances")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", type=Path, default=Path("runs/learnability"))
    p.add_argument("--table", type=Path, help="markdown table (default: OUT/learnability.md)")
    p.add_argument("--recipes", type=Path, help="YAML {task: [override, ...]}: replaces those")
    p.add_argument(
        "--sweep-results",
        type=Path,
        help="JSON {task: {method: {init, end, overrides}}}: a new-dataset sweep's best runs",
    )
    p.add_argument("--table-only", action="store_true", help="only rebuild the table")
    p.add_argument("--smoke-test", action="store_true", help=f"CI: {SMOKE}")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.methods, args.tasks, args.epochs = SMOKE["methods"], SMOKE["tasks"], SMOKE["epochs"]
    if args.naive_epochs is None:
        args.naive_epochs = args.epochs
    for flag, given, allowed in (
        ("--methods", args.methods, METHODS),
        ("--tasks", args.tasks, TASKS),
    ):
        bad = [x for x in given if x not in allowed]
        if bad:
            p.error(f"{flag}: unknown {bad}; allowed: {', '.join(allowed)}")
    if args.epochs < 1 or args.naive_epochs < 0:
        p.error("--epochs must be >= 1 and --naive-epochs >= 0")
    args.table = args.table or args.out / "learnability.md"
    return args


def load_recipes(path: Path | None) -> dict[str, tuple[str, ...]]:
    """:data:`RECIPES`, with the tasks a YAML file lists replaced by its overrides."""
    recipes = dict(RECIPES)
    if path is None:
        return recipes
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must map task -> list of overrides")
    for task, overrides in data.items():
        if task not in TASKS:
            raise ConfigError(f"{path}: unknown task {task!r}; allowed: {', '.join(TASKS)}")
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{path}: {task}: expected a list of 'section.key=value' strings")
        recipes[task] = tuple(overrides)
    return recipes


def load_sweep(path: Path | None) -> dict[str, dict[str, dict[str, Any]]]:
    """A new-dataset sweep's best runs: JSON ``{task: {method: {"init": kNN %, "end": kNN %,
    ...}}}`` (other keys, e.g. the winning ``overrides``, are kept but not shown)."""
    if path is None:
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must map task -> method -> {{init, end}}")
    for task, per_method in data.items():
        if task not in TASKS:
            raise ConfigError(f"{path}: unknown task {task!r}; allowed: {', '.join(TASKS)}")
        if not isinstance(per_method, dict):
            raise ConfigError(f"{path}: {task}: expected a mapping method -> {{init, end}}")
        for method, best in per_method.items():
            if method not in METHODS:
                raise ConfigError(
                    f"{path}: {task}: unknown method {method!r}; allowed: {', '.join(METHODS)}"
                )
            ok = isinstance(best, dict) and all(
                isinstance(best.get(k), int | float) for k in ("init", "end")
            )
            if not ok:
                raise ConfigError(f"{path}: {task}.{method}: needs numbers 'init' and 'end'")
    return data


def run_overrides(
    method: str, task: str, variant: str, recipes: dict, sets: Sequence[str] = ()
) -> tuple[str, ...]:
    """The overrides that make a run differ from the method's defaults: the small-data
    settings, the table's own ``--set`` values, then (variant ``recipe``) the task's recipe."""
    return (
        *METHOD_CONFIGS[method].small_data,
        *sets,
        *(recipes[task] if variant == "recipe" else ()),
    )


def run_config(method: str, overrides: Sequence[str], data_dir: Path, args):
    """The resolved config of one run; the harness's own fields (data, protocol, epochs, seed)
    are set last, so no recipe can change them."""
    raw = apply_overrides({"method": {"name": method}}, overrides)
    fixed = {
        "data": {
            "dataset": "parquet",
            "root": str(data_dir / "train"),
            "test_root": str(data_dir / "test"),
            "image_size": args.image_size,
        },
        "eval": {"knn_k": KNN.knn_k, "knn_t": KNN.knn_t},
        "train": {
            "epochs": args.epochs,
            "seed": args.seed,
            "device": args.device,
        },
    }
    for section, values in fixed.items():
        raw.setdefault(section, {}).update(values)
    return make_config(raw)


def _key(task: str, method: str, variant: str, epochs: int, overrides, args) -> str:
    return "|".join(
        [task, method, variant, f"e{epochs}", f"s{args.seed}", f"t{args.task_seed}"]
        + ([f"px{args.image_size}"] if args.image_size != 32 else [])
        + list(overrides)
    )


def _machine() -> str:
    dev = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, {dev}"


def load_results(out: Path) -> list[dict[str, Any]]:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else []


def save_results(out: Path, results: list[dict[str, Any]]) -> None:
    """``results.json`` (atomically: an interrupted write keeps the old file) and ``.csv``."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out / "results.json")
    cols = ["task", "role", "method", "variant", "epochs", "init_knn", "final_knn", "best_knn"]
    cols += ["raw_pixel_knn", "wall_s", "knn_k", "knn_t", "eval_feature", "overrides", "run_dir"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({**r, "overrides": " ".join(r.get("overrides", []))})


# --------------------------------------------------------------------------- the table


def _cell(r: dict | None, pixels: float | None) -> str:
    if r is None:
        return "—"
    text = f"{r['init_knn']:.1f} → {r['final_knn']:.1f}"
    if r["final_knn"] < r["init_knn"]:
        text += f" {BELOW_INIT}"
    if pixels is not None and r["final_knn"] <= pixels:
        text += f" {NOT_ABOVE_PIXELS}"
    return text


def render_table(
    results: list[dict[str, Any]],
    tasks: Sequence[str],
    methods: Sequence[str],
    recipes: dict[str, tuple[str, ...]],
    args: argparse.Namespace,
    sweep: dict[str, Any] | None = None,
) -> str:
    """The markdown table: a row per method (then the naive loop and raw pixels), per task a
    "defaults", a "recipe" and a "best of a new-dataset sweep" column (each "init → end" kNN
    top-1 %)."""
    by_key = {r["key"]: r for r in results}
    sweep = sweep or {}

    def find(task: str, method: str, variant: str, epochs: int, overrides) -> dict | None:
        return by_key.get(_key(task, method, variant, epochs, overrides, args))

    pixels = {t: find(t, RAW, "-", 0, ()) for t in tasks}
    px = {t: (r["final_knn"] if r else None) for t, r in pixels.items()}
    head = ["method"]
    for t in tasks:
        role = get_task(t).role
        head += [f"{t} ({role}): defaults", f"{t}: recipe", f"{t}: best of sweep"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        row = [f"`{m}`"]
        for t in tasks:
            for v in VARIANTS:
                r = find(t, m, v, args.epochs, run_overrides(m, t, v, recipes, args.sets))
                row.append(_cell(r, px[t]))
            s = sweep.get(t, {}).get(m)
            row.append(_cell({"init_knn": s["init"], "final_knn": s["end"]}, px[t]) if s else "—")
        lines.append("| " + " | ".join(row) + " |")
    row = [f"naive SimCLR loop ({args.naive_epochs} ep.)"]
    for t in tasks:
        r = find(t, NAIVE, "reference", args.naive_epochs, ())
        row += [_cell(r, px[t]), "—", "—"]
    lines.append("| " + " | ".join(row) + " |")
    row = ["raw pixels"]
    for t in tasks:
        row += [f"{px[t]:.1f}" if px[t] is not None else "—", "—", "—"]
    lines.append("| " + " | ".join(row) + " |")

    tune = [t for t in tasks if get_task(t).role == "tune"]
    report = [t for t in tasks if get_task(t).role == "report"]
    machines = sorted({r["machine"] for r in results if "machine" in r})
    notes = [
        f"- kNN top-1 (%) on the {TEST_SIZE} test images, memory the {1797 - TEST_SIZE} train "
        f"images: weighted cosine kNN, k={KNN.knn_k}, T={KNN.knn_t} (EMP-SSL: on its "
        "patch-averaged features, its own protocol). Each cell reads random-init encoder → "
        f"after {args.epochs} epoch(s) (naive loop: {args.naive_epochs}); seed {args.seed}, "
        f"task seed {args.task_seed}; images at {args.image_size} px"
        + (f"; every run also {' '.join(f'`{o}`' for o in args.sets)}" if args.sets else "")
        + ".",
        f"- {BELOW_INIT}: ended below its random init (a shortcut or a collapse); "
        f"{NOT_ABOVE_PIXELS}: not above kNN on raw pixels; —: not run (yet).",
        f"- Tune tasks (recipes and defaults may be chosen on them): {', '.join(tune) or 'none'}."
        f" Report tasks (held out, only measured): {', '.join(report) or 'none'}.",
        "- defaults: the method's defaults + its config class's `small_data`; recipe: the "
        "same + the task's recipe (below); best of sweep: a new-dataset sweep's best run, "
        "when given (`--sweep-results`). SupCon uses the labels (a supervised reference). The "
        "naive loop is `contrastlab.naive.naive_simclr` with its defaults.",
        "",
        "| task | nuisance | role | recipe |",
        "|---|---|---|---|",
    ]
    for t in tasks:
        task = get_task(t)
        recipe = " ".join(f"`{o}`" for o in recipes[t]) or "none"
        notes.append(f"| {t} | {task.nuisance} | {task.role} | {recipe} |")
    notes += ["", f"Measured on: {'; '.join(machines) or '—'}."]
    title = "# Learnability: methods on small real-data tasks with nuisances\n\n"
    note = "Generated by `pipelines/learnability.py`; numbers from its results file.\n\n"
    return title + note + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


# --------------------------------------------------------------------------- the runs


def _record(task: str, method: str, variant: str, epochs: int, overrides, args, **m) -> dict:
    return {
        "key": _key(task, method, variant, epochs, overrides, args),
        "task": task,
        "role": get_task(task).role,
        "method": method,
        "variant": variant,
        "epochs": epochs,
        "seed": args.seed,
        "task_seed": args.task_seed,
        "overrides": list(overrides),
        "knn_k": KNN.knn_k,
        "knn_t": KNN.knn_t,
        "machine": _machine(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        **m,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        recipes = load_recipes(args.recipes)
        sweep = load_sweep(args.sweep_results)
    except (ConfigError, OSError, json.JSONDecodeError, yaml.YAMLError) as e:
        print(f"learnability: error: {e}", file=sys.stderr)
        return 2
    results = load_results(args.out)
    done = {r["key"] for r in results}
    plan = [(t, m, v) for t in args.tasks for m in args.methods for v in args.variants]
    if not args.table_only:
        # every config is checked before anything trains: a recipe naming a field this
        # checkout lacks stops here, naming the task and the key
        for t, m, v in plan:
            try:
                overrides = run_overrides(m, t, v, recipes, args.sets)
                run_config(m, overrides, args.out / "data" / t, args)
            except ConfigError as e:
                print(f"learnability: error: {t} / {m} / {v}: {e}", file=sys.stderr)
                return 2
    total = len(plan) + len(args.tasks) * (2 if args.naive_epochs else 1)
    i = 0

    def progress(what: str, text: str) -> None:
        print(f"[{i}/{total}] {what:<38} {text}", flush=True)

    for task in [] if args.table_only else args.tasks:
        data_dir = args.out / "data" / task
        write_task(task, data_dir, seed=args.task_seed)
        cfg0 = run_config("simclr", (), data_dir, args)
        splits = load_dataset(cfg0.data)

        i += 1
        rec = _record(task, RAW, "-", 0, (), args)
        if rec["key"] in done:
            progress(f"{task} / {RAW}", "in results: skipped")
        else:
            start = time.perf_counter()
            acc = raw_pixel_knn(splits, KNN)
            wall = time.perf_counter() - start
            rec.update(init_knn=acc, final_knn=acc, best_knn=acc, raw_pixel_knn=acc, wall_s=wall)
            results.append(rec)
            save_results(args.out, results)
            progress(f"{task} / {RAW}", f"kNN {acc:.1f}%")
        pixels = next(r["final_knn"] for r in results if r["key"] == rec["key"])

        if args.naive_epochs:
            i += 1
            rec = _record(task, NAIVE, "reference", args.naive_epochs, (), args)
            if rec["key"] in done:
                progress(f"{task} / {NAIVE}", "in results: skipped")
            else:
                n = naive_simclr(splits, args.naive_epochs, KNN, seed=args.seed)
                rec.update(
                    init_knn=n["init_knn_top1"],
                    final_knn=n["knn_top1"],
                    best_knn=n["best_knn_top1"],
                    raw_pixel_knn=pixels,
                    wall_s=n["wall_s"],
                    history=n["history"],
                    settings=n["settings"],
                    eval_feature="backbone",
                )
                results.append(rec)
                save_results(args.out, results)
                progress(f"{task} / {NAIVE}", _line(rec))

        for method in args.methods:
            for variant in args.variants:
                i += 1
                overrides = run_overrides(method, task, variant, recipes, args.sets)
                rec = _record(task, method, variant, args.epochs, overrides, args)
                what = f"{task} / {method} / {variant}"
                if rec["key"] in done:
                    progress(what, "in results: skipped")
                    continue
                digest = hashlib.sha1(rec["key"].encode()).hexdigest()[:8]
                name = f"{task}/{method}-{variant}-e{args.epochs}-{digest}"
                cfg = run_config(method, overrides, data_dir, args)
                start = time.perf_counter()
                res = train(cfg, RunPlace(args.out / "runs" / name), resume=True, data=splits)
                f = res.final
                rec.update(
                    init_knn=f["init_knn_top1"],
                    final_knn=f["knn_top1"],
                    best_knn=f["best_knn_top1"],
                    raw_pixel_knn=pixels,
                    wall_s=time.perf_counter() - start,
                    eval_feature=cfg.eval.feature,
                    run_dir=str(res.run_dir),
                )
                results.append(rec)
                save_results(args.out, results)
                progress(what, _line(rec))

    text = render_table(results, args.tasks, args.methods, recipes, args, sweep)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    print(f"table: {args.table}; results: {args.out / 'results.json'}", flush=True)
    return 0


def _line(r: dict) -> str:
    flag = f" {BELOW_INIT} below init" if r["final_knn"] < r["init_knn"] else ""
    return (
        f"kNN {r['init_knn']:.1f} → {r['final_knn']:.1f}% (best {r['best_knn']:.1f}%){flag} | "
        f"raw px {r['raw_pixel_knn']:.1f}% | {r['wall_s']:.0f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
