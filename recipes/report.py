"""Collect every ``results.json`` under some folders into a Markdown results page (a table
per task: method, settings, embedding compression ratio, metric, change against dense,
time; and whether the compression targets are met) and one matplotlib PNG per task of the
metric against the compression ratio (log x axis).

    python -m recipes.report runs/ --out RESULTS.md --plots recipes/plots --notes notes.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["collect", "label", "render", "plot_group", "main"]

Group = Tuple[str, str, str, int]  # task, dataset, scale, steps (0: one budget in the group)
TARGETS = {"default": 10.0, "sentiment": 100.0}  # ratio needed within 1% of dense
TOLERANCE = 0.01
FAMILIES = {"tt": "TT", "tr": "TT", "dpq": "DPQ"}


def collect(folders: Sequence[Path]) -> List[Dict]:
    """Every readable results.json under ``folders`` (recursively), with ``"path"`` added.
    Files that are not results (no task/method/value) are skipped with a warning."""
    results = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
        for path in sorted(folder.rglob("results.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                print(f"warning: skipping {path}: {err}", file=sys.stderr)
                continue
            if not isinstance(data, dict) or not {"task", "method", "value"} <= set(data):
                print(f"warning: skipping {path}: not a recipe results file", file=sys.stderr)
                continue
            data["path"] = str(path)
            results.append(data)
    return results


def _higher_is_better(r: Dict) -> bool:
    if "higher_is_better" in r:
        return bool(r["higher_is_better"])
    metric = str(r.get("metric", "")).lower()
    return not any(k in metric for k in ("ppl", "perplexity", "loss", "error"))


def label(r: Dict) -> str:
    """A short name for a run's setting: ``dense``, ``tt r=16``, ``dpq-vq K=32 D=64``."""
    s = dict(r.get("settings") or {})
    method = r["method"]
    if method in ("tt", "tr"):
        text = f"{method} r={s.get('rank')}"
        if s.get("num_factors") is not None:
            text += f" N={s['num_factors']}"
    elif method == "dpq":
        text = f"dpq-{s.get('variant', 'sx')} K={s.get('num_codes')} D={s.get('num_groups')}"
        if s.get("shared_subspace"):
            text += " shared"
        if s.get("commitment"):
            text += f" beta={s['commitment']}"
    else:
        text = method
    if r.get("output"):
        text += f" ({r['output']} softmax)"
    return text


def _group_key(r: Dict) -> Group:
    return (str(r["task"]), str(r.get("dataset", "-")), str(r.get("scale", "-")), 0)


def group_runs(results: List[Dict]) -> Dict[Group, List[Dict]]:
    """Runs by task, dataset and scale; where those runs trained for different numbers of
    steps (``steps`` in results.json), one group per budget, so that a run is only
    compared with the dense runs of its own budget."""
    groups: Dict[Group, List[Dict]] = defaultdict(list)
    for r in results:
        groups[_group_key(r)].append(r)
    for key, rows in list(groups.items()):
        budgets = {r.get("steps") for r in rows}
        if len(budgets) > 1:
            del groups[key]
            for r in rows:
                steps = r.get("steps")
                groups[key[:3] + (int(steps) if isinstance(steps, (int, float)) else -1,)].append(r)
    return groups


def _group_title(key: Group) -> str:
    task, dataset, scale, steps = key
    budget = "" if steps == 0 else (", steps unknown" if steps < 0 else f", {steps} steps")
    return f"{task}: {dataset} ({scale} scale{budget})"


def _group_file(key: Group) -> str:
    task, dataset, scale, steps = key
    budget = "" if steps == 0 else f"-{steps if steps > 0 else 'unknown'}steps"
    return f"{task}-{dataset}-{scale}{budget}.png".replace("/", "_")


def _baseline(rows: List[Dict], output: Optional[str] = None) -> Optional[float]:
    """The mean of the dense runs; with ``output`` (a language model's softmax: "tied",
    "untied", "dense"), of the dense runs with that softmax when there are any. A dense
    model with an untied softmax is the dense counterpart of a compressed input with a
    dense softmax (the same two dense tables), so "dense" falls back to "untied"."""
    dense = [r for r in rows if r["method"] == "dense" and _finite(r["value"])]
    same = [r for r in dense if r.get("output") == output]
    if not same and output == "dense":
        same = [r for r in dense if r.get("output") == "untied"]
    values = [r["value"] for r in (same if output is not None and same else dense)]
    return sum(values) / len(values) if values else None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _rel(value: float, base: Optional[float], higher: bool) -> Optional[float]:
    """Relative change against dense, signed so that negative is worse."""
    if base is None or not _finite(value) or base == 0:
        return None
    change = (value - base) / abs(base)
    return change if higher else -change


def _fmt_time(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _structure(r: Dict) -> str:
    """The compressed layers' structure as the compression report gives it
    (``(24,27,29)x(4,8,8) r=8``), else the non-default settings."""
    layers = (r.get("report") or {}).get("layers") or []
    if layers:
        return "; ".join(str(layer.get("shape", "?")) for layer in layers)
    s = {k: v for k, v in (r.get("settings") or {}).items() if k != "method"}
    return ", ".join(f"{k}={v}" for k, v in s.items()) or "-"


def _run_name(r: Dict) -> str:
    return Path(r["path"]).parent.name if r.get("path") else "-"


def target_lines(task: str, rows: List[Dict]) -> List[str]:
    """One line per method family: is there a setting at the target ratio within 1% of dense
    (of the dense runs with the same softmax, where the model has one)?"""
    need = TARGETS.get(task, TARGETS["default"])
    if _baseline(rows) is None:
        return ["- no dense run: targets cannot be checked"]
    lines = []
    for family in ("TT", "DPQ"):
        members = _mean_over_seeds([r for r in rows if FAMILIES.get(r["method"]) == family])
        if not members:
            lines.append(f"- {family}: no runs")
            continue
        hits = [r for r in members if r.get("embedding_ratio", 0) >= need
                and _score(r, _baseline(rows, r.get("output"))) >= -TOLERANCE]
        if hits:
            best = max(hits, key=lambda r: r["embedding_ratio"])
            lines.append(f"- {family}: **met**: {_runs_label(best)} at {best['embedding_ratio']:.0f}x is within "
                         f"1% of dense ({_pct(_rel(best['value'], _baseline(rows, best.get('output')), _higher_is_better(best)))})")
        else:
            at_ratio = [r for r in members if r.get("embedding_ratio", 0) >= need]
            if at_ratio:
                best = max(at_ratio, key=lambda r: _score(r, _baseline(rows, r.get("output"))))
                lines.append(f"- {family}: **missed**: no setting at >= {need:.0f}x within 1% of dense; "
                             f"the closest is {_runs_label(best)} at {best['embedding_ratio']:.0f}x "
                             f"({_pct(_rel(best['value'], _baseline(rows, best.get('output')), _higher_is_better(best)))})")
            else:
                lines.append(f"- {family}: **missed**: no run reached {need:.0f}x compression")
    return lines


def _mean_over_seeds(rows: List[Dict]) -> List[Dict]:
    """One row per setting (same method settings and output): the mean value of its runs."""
    groups: Dict[str, List[Dict]] = defaultdict(list)
    for r in rows:
        if _finite(r["value"]):
            groups[json.dumps([r.get("settings"), r.get("output")], sort_keys=True)].append(r)
    merged = []
    for members in groups.values():
        row = dict(members[0], value=sum(m["value"] for m in members) / len(members), runs=len(members))
        merged.append(row)
    return merged


def _runs_label(r: Dict) -> str:
    n = r.get("runs", 1)
    return label(r) + (f" (mean of {n} runs)" if n > 1 else "")


def _score(r: Dict, base: Optional[float]) -> float:
    rel = _rel(r["value"], base, _higher_is_better(r))
    return -math.inf if rel is None else rel


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:+.2f}%"


def plot_group(key: Group, rows: List[Dict], path: Path) -> Path:
    """PNG of metric against embedding compression ratio (log x), one marker per method,
    dense as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    markers = {"tt": "o", "tr": "D", "dpq": "s"}
    by_method: Dict[str, List[Dict]] = defaultdict(list)
    for r in rows:
        if _finite(r["value"]):
            by_method[r["method"]].append(r)
    base = _baseline(rows)
    if base is not None:
        ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="dense (mean of runs)")
        ax.axhspan(base * (1 - TOLERANCE), base * (1 + TOLERANCE), color="grey", alpha=0.12,
                   label="within 1% of dense")
    for method, members in sorted(by_method.items()):
        if method == "dense":
            continue
        members.sort(key=lambda r: r.get("embedding_ratio", 1.0))
        xs = [max(r.get("embedding_ratio", 1.0), 1e-3) for r in members]
        ys = [r["value"] for r in members]
        ax.scatter(xs, ys, marker=markers.get(method, "^"), label=method, zorder=3)
        for x, y, r in zip(xs, ys, members):
            ax.annotate(label(r).replace(f"{method} ", "").replace("dpq-", ""), (x, y),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    dense = [r["value"] for r in by_method.get("dense", [])]
    if dense:
        ax.scatter([1.0] * len(dense), dense, color="black", marker="*", zorder=3, label="dense runs")
    ax.set_xscale("log")
    ax.set_xlabel("embedding compression ratio (dense bytes / stored bytes)")
    metric = rows[0].get("metric", "metric")
    ax.set_ylabel(metric + ("" if _higher_is_better(rows[0]) else " (lower is better)"))
    ax.set_title(_group_title(key))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def render(results: List[Dict], plots_dir: Optional[Path] = None, page: Optional[Path] = None,
           notes: str = "", command: str = "") -> str:
    """The Markdown page; writes one PNG per task group into ``plots_dir`` when given
    (linked relative to ``page``'s folder)."""
    groups = group_runs(results)
    out = ["# Results", "",
           "Measured with this repository's recipes; every number below comes from a "
           "`results.json` written by a run (nothing is copied from the papers).",
           f"Generated by `{command}`." if command else "", ""]
    if notes.strip():
        out += [notes.strip(), ""]
    for key in sorted(groups):
        rows = sorted(groups[key], key=lambda r: (r["method"] != "dense", r.get("embedding_ratio", 1.0), label(r)))
        task, dataset = key[:2]
        higher = _higher_is_better(rows[0])
        metric = rows[0].get("metric", "metric")
        out += [f"## {_group_title(key)}", ""]
        hw = sorted({r.get("hardware", "?") for r in rows})
        out += [f"Metric: `{metric}` ({'higher' if higher else 'lower'} is better). "
                f"Hardware: {'; '.join(hw)}.", ""]
        out += ["| run | method | structure | emb. ratio | emb. stored | total params | "
                f"{metric} | vs dense | time |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            stored = r.get("embedding_stored_bytes") or (4 * r.get("embedding_parameters", 0))
            out.append(
                f"| {_run_name(r)} | {label(r)} | {_structure(r)} | {r.get('embedding_ratio', 1.0):.1f}x | "
                f"{stored / 1024:.1f} KiB | {r.get('total_parameters', 0):,} | "
                f"{r['value']:.4f} | {_pct(_rel(r['value'], _baseline(rows, r.get('output')), higher)) if r['method'] != 'dense' else '-'} | "
                f"{_fmt_time(r.get('wall_time_s', 0.0))} |")
        out += ["", "\"vs dense\": relative change of the metric against the mean of the dense runs "
                "(with the same softmax, tied or untied, where the model has one; a dense softmax "
                "behind a compressed input is compared with the dense untied runs where no dense "
                "run says `dense softmax`), signed so that negative is worse."]
        for output in sorted({r.get("output") or "" for r in rows if r["method"] == "dense"}):
            dense = [r["value"] for r in rows if r["method"] == "dense" and (r.get("output") or "") == output
                     and _finite(r["value"])]
            if len(dense) > 1:
                mean = sum(dense) / len(dense)
                what = f"dense runs ({output} softmax, seeds)" if output else "dense runs (seeds)"
                out += [f"The {len(dense)} {what} give {min(dense):.4f} to {max(dense):.4f}, "
                        f"mean {mean:.4f}: a spread of {100 * (max(dense) - min(dense)) / abs(mean):.1f}% "
                        f"of the mean from the seed alone."]
        out += [""]
        need = TARGETS.get(task, TARGETS["default"])
        out += [f"Target: a TT and a DPQ setting at >= {need:.0f}x embedding compression within 1% "
                f"(relative) of dense (a setting run with several seeds counts with its mean):", ""]
        out += target_lines(task, rows) + [""]
        if plots_dir is not None:
            png = plot_group(key, rows, Path(plots_dir) / _group_file(key))
            link = os.path.relpath(png, Path(page).parent if page else Path.cwd())
            out += [f"![{task} {dataset}]({Path(link).as_posix()})", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders searched for results.json")
    parser.add_argument("--out", type=Path, default=Path("RESULTS.md"), help="the Markdown page")
    parser.add_argument("--plots", type=Path, default=Path("recipes/plots"), help="folder for the PNGs")
    parser.add_argument("--notes", type=Path, help="a Markdown file put under the title")
    args = parser.parse_args(argv)
    try:
        results = collect(args.folders)
        notes = args.notes.read_text() if args.notes else ""
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if not results:
        parser.error(f"no results.json found under {', '.join(map(str, args.folders))}")
    command = "python -m recipes.report " + " ".join(argv if argv is not None else sys.argv[1:])
    page = render(results, args.plots, args.out, notes, command)
    args.out.write_text(page)
    print(f"wrote {args.out} ({len(results)} runs) and plots in {args.plots}")


if __name__ == "__main__":
    main()
