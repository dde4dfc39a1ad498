"""The report of an evaluation (docs/design.md §6): ``cases.json``, ``cases.csv``, ``summary.json``,
``summary.md`` (Table 1 of the paper, the iterated table, the paired comparisons and the simulator gap) and the
scatter plots.  :func:`write_report` and :func:`summary_markdown` are re-exported by :mod:`.evaluation`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["summary_markdown", "write_report"]

_CSV_FIELDS = ("case", "seed", "method", "initial_mtre_mm", "mtre_one_update_mm", "mrpd_one_update_mm",
               "mtre_final_mm", "mrpd_final_mm", "iterations", "seconds", "seconds_one_update", "status",
               "primary_deg", "secondary_deg")


def _finite(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _json_safe(obj: Any) -> Any:
    """NaN / infinities -> None so that the JSON files stay standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _pm(mean: float, sd: float, digits: int = 2) -> str:
    return f"{_fmt(mean, digits)} ± {_fmt(sd, digits)}"


def _seed_text(cfg: Mapping) -> str:
    """``0..99`` for consecutive seeds, ``0..9, 20..29`` for the seeds of joined runs."""
    seeds = cfg.get("seeds") or list(range(cfg["seed"], cfg["seed"] + cfg["n_cases"]))
    runs: list[list[int]] = []
    for s_ in seeds:
        if runs and s_ == runs[-1][1] + 1:
            runs[-1][1] = s_
        else:
            runs.append([s_, s_])
    return ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in runs)


def summary_markdown(result: Mapping) -> str:
    """Markdown tables of an :func:`evaluate` result: one update (like Table 1 of the paper) and iterated."""
    cfg, summ = result["config"], result["summary"]
    ini = summ["initial"]
    lines = [
        "# PPC registration evaluation",
        "",
        f"{cfg['n_cases']} simulated cases (seeds {_seed_text(cfg)}), initial mTRE "
        f"uniform in [{cfg['mtre_range'][0]:g}, {cfg['mtre_range'][1]:g}] mm, {cfg['detector_px']} px detector, "
        f"ROI {cfg['roi']} ({cfg['n_targets']} target points), device {cfg['device']}.",
        "",
        "## After one update (as Table 1 of the paper)",
        "",
        *([f"Model files: {', '.join(f'{m}: {p}' for m, p in cfg['models'].items())}.", ""]
          if cfg.get("models") else []),
        "| model | mTRE p50 | p75 | p95 | mTRE mean ± sd [mm] | reduction factor | mRPD mean [mm] |",
        "|---|---|---|---|---|---|---|",
        f"| initial | {_fmt(ini['mtre_p50'])} | {_fmt(ini['mtre_p75'])} | {_fmt(ini['mtre_p95'])} | "
        f"{_pm(ini['mtre_mean'], ini['mtre_sd'])} | | |",
    ]
    for m, s in summ["methods"].items():
        o = s["one_update"]
        lines.append(f"| {m} | {_fmt(o['mtre_p50'])} | {_fmt(o['mtre_p75'])} | {_fmt(o['mtre_p95'])} | "
                     f"{_pm(o['mtre_mean'], o['mtre_sd'])} | "
                     f"{_pm(o['reduction_factor_mean'], o.get('reduction_factor_sd', math.nan))} | "
                     f"{_fmt(o['mrpd_mean'])} |")
    rf_note = ("Reduction factor of a case = 1 − mTRE_after / mTRE_before when the error decreased, 0 when it grew.")
    one_only = cfg.get("one_update_only", cfg["iterations"] == 1)
    paired = summ.get("paired") or []
    if paired:
        lines += ["", "Paired on the same cases, after one update: mean of mTRE(A) − mTRE(B) with its 95 % "
                  "confidence interval (negative: A better), and the cases where A is lower.", "",
                  "| A | B | mean difference [mm] | 95 % CI | A lower |", "|---|---|---|---|---|"]
        for c in paired:
            lo, hi = c["one_update_diff_ci95"]
            lines.append(f"| {c['a']} | {c['b']} | {_fmt(c['one_update_diff_mean'])} | [{_fmt(lo)}, {_fmt(hi)}] | "
                         f"{c['one_update_a_lower']} of {c['n']} |")
    if one_only:
        lines += ["", rf_note, "One update only (iterations = 1): no iterated registration.", ""]
        return "\n".join(lines)
    chained = [m for m in summ["methods"] if "+" in m]
    lines += [
        "",
        f"## Iterated registration (at most {cfg['iterations']} updates, tolerance {cfg['tolerance_mm']:g} mm)",
        "",
        "| model | mTRE p50 | p75 | p95 | mTRE mean ± sd [mm] | reduction factor | success < 2 mm | "
        "success < 5 mm | mRPD mean [mm] | iterations | s / case | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in summ["methods"].items():
        f = s["final"]
        status = ", ".join(f"{k} {v}" for k, v in sorted(s["status_counts"].items()))
        lines.append(f"| {m} | {_fmt(f['mtre_p50'])} | {_fmt(f['mtre_p75'])} | {_fmt(f['mtre_p95'])} | "
                     f"{_pm(f['mtre_mean'], f['mtre_sd'])} | "
                     f"{_pm(f['reduction_factor_mean'], f.get('reduction_factor_sd', math.nan))} | "
                     f"{_fmt(100 * f['success_2mm'], 0)} % | {_fmt(100 * f['success_5mm'], 0)} % | "
                     f"{_fmt(f['mrpd_mean'])} | {_fmt(f.get('iterations_mean', math.nan), 1)} | "
                     f"{_fmt(f['seconds_per_case'], 3)} | {status} |")
    if paired:
        lines += ["", "Paired on the same cases, final: the cases only A and only B bring below 2 mm, and the "
                  "two-sided exact sign-test p-value of that split (McNemar).", "",
                  "| A | B | < 2 mm only A | only B | p |", "|---|---|---|---|---|"]
        for c in paired:
            lines.append(f"| {c['a']} | {c['b']} | {c['final_only_a']} | {c['final_only_b']} | "
                         f"{_fmt(c['final_p_value'], 3)} |")
    lines += _simulator_gap_lines(paired)
    lines += ["", rf_note + " Seconds per case: median wall time."]
    if chained:
        lines += [f"Chained methods ({', '.join(chained)}): learned updates first (at most "
                  f"{cfg.get('learned_steps', '?')}, or until a learned update is below {cfg.get('switch_mm', '?')} "
                  "mm), then classic PPC updates"
                  + ("; when the result correlates poorly with the X-ray, the classic registration from the initial "
                     "estimate (classic fallback)." if cfg.get("classic_fallback") else "; no classic fallback.")]
    lines.append("")
    return "\n".join(lines)


def _simulator_gap_lines(paired: Sequence[Mapping]) -> list[str]:
    """The table of each method's success on the physics X-rays against the same method on the DRR X-rays."""
    rows = [c for c in paired if c["a"].endswith("@physics") and c["a"].rsplit("@", 1)[0] == c["b"]]
    if not rows:
        return []
    lines = ["", "Simulator gap: each method on the physics X-rays (test only) against itself on the training "
             "simulator's X-rays of the same cases (same views, ground truth and initial estimates).", "",
             "| method | < 2 mm only on DRR | only on physics | McNemar p |", "|---|---|---|---|"]
    for c in rows:
        lines.append(f"| {c['b']} | {c['final_only_b']} | {c['final_only_a']} | {_fmt(c['final_p_value'], 3)} |")
    return lines


def write_report(result: Mapping, out_dir: str | Path) -> dict[str, Path]:
    """Write ``cases.json``, ``cases.csv``, ``summary.json``, ``summary.md``, ``scatter_one_update.png`` and
    ``scatter_final.png`` of an :func:`evaluate` result into ``out_dir``; returns the paths by name."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("cases.json", "cases.csv", "summary.json", "summary.md",
                                           "scatter_one_update.png", "scatter_final.png")}
    paths["cases.json"].write_text(json.dumps(_json_safe({"config": result["config"], "cases": result["cases"]}),
                                              indent=1) + "\n", encoding="utf-8")
    with open(paths["cases.csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        w.writeheader()
        for rec in result["cases"]:
            for m, r in rec["methods"].items():
                w.writerow({"case": rec["case"], "seed": rec["seed"], "method": m,
                            "initial_mtre_mm": rec["initial_mtre_mm"],
                            "primary_deg": rec["view"].get("primary_deg"),
                            "secondary_deg": rec["view"].get("secondary_deg"),
                            **{k: r[k] for k in _CSV_FIELDS if k in r}})
    paths["summary.json"].write_text(json.dumps(_json_safe({"config": result["config"], **result["summary"]}),
                                                indent=2) + "\n", encoding="utf-8")
    paths["summary.md"].write_text(summary_markdown(result), encoding="utf-8")

    from .viz import scatter_plot

    initial = [rec["initial_mtre_mm"] for rec in result["cases"]]
    methods = list(result["summary"]["methods"])
    scatter_plot(paths["scatter_one_update.png"],
                 {m: (initial, [rec["methods"][m]["mtre_one_update_mm"] for rec in result["cases"]])
                  for m in methods}, ylabel="mTRE after one update [mm]", title="initial vs one update")
    scatter_plot(paths["scatter_final.png"],
                 {m: (initial, [rec["methods"][m]["mtre_final_mm"] for rec in result["cases"]]) for m in methods},
                 ylabel="final mTRE [mm]", title=f"initial vs final (at most {result['config']['iterations']} updates)")
    return paths
