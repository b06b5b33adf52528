"""The real recipe's pre-registered test (docs/results.md, "The real recipe"), from the runs `opd experiment` made:
`python -m bench real_experiment [--root DIR] [--name real-ctx] [--arms opd,topd-window] [--out F]`.

Per run (NAME-ARM-sSEED) it reads the greedy evaluations through the `evals` view (hash-verified): the initial
student (`baseline`), the teacher with its context (`teacher_eval`) and the student after each iteration
(`evaluate`), all on the one shared eval set. Then, per arm:
- per seed and step: accuracy, reverse KL per token (`rkl_per_token`: the sum over answers / answer tokens, as
  the manifest's), truncated share;
- G = (acc_final - acc_student) / (acc_teacher - acc_student) per seed and its mean (R1), with a seed-then-question
  bootstrap 95% CI of acc_final - acc_student (`opd_tasks.stats.bootstrap_ci`) and of G (each replicate draws
  seeds, then questions, the same questions for the student before, after, and the teacher);
- R2: whether rkl_per_token after the last iteration is below the baseline's on every seed (and, not
  pre-registered, the same for the reverse KL per answer, `rkl_per_sequence`);
- between arms (R3): the paired per-seed difference of acc_final with its t interval (`opd_tasks.stats.paired_t`).
Writes bench/results/real_experiment.json unless --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def read_evals(root: Path, runs: list[str]) -> dict[str, dict[int, dict[str, tuple]]]:
    """run -> step -> prompt_id -> (correct, rkl, num_tokens, truncated) of those of `runs` that exist; step -1 is
    the teacher's evaluation."""
    from storage.layout import Layout
    from storage.lineage import list_runs
    from storage.views import connect

    out: dict[str, dict[int, dict[str, tuple]]] = {}
    runs = sorted(set(runs) & {r.run for r in list_runs(Layout(root))})
    if not runs:
        return out
    with connect(root, runs) as con:
        rows = con.execute("SELECT run, iteration, stage, prompt_id, correct, rkl, num_tokens, truncated FROM evals "
                           "WHERE run IN (SELECT unnest($runs))", {"runs": runs}).fetchall()
    for run, iteration, stage, pid, correct, rkl, n, truncated in rows:
        step = {"baseline": 0, "teacher_eval": -1}.get(stage, iteration + 1)
        out.setdefault(run, {}).setdefault(step, {})[pid] = (correct, rkl, n, truncated)
    return out


def step_figures(answers: dict[str, tuple]) -> dict:
    correct = [a[0] for a in answers.values() if a[0] is not None]
    rkl = [a[1] for a in answers.values() if a[1] is not None]
    tokens = sum(a[2] for a in answers.values() if a[1] is not None)
    return {"n": len(answers), "accuracy": sum(correct) / len(correct) if correct else None,
            "rkl_per_token": sum(rkl) / tokens if rkl and tokens else None,
            "rkl_per_sequence": sum(rkl) / len(rkl) if rkl else None,
            "truncated": sum(a[3] for a in answers.values()) / len(answers)}


def g_bootstrap(base: list[np.ndarray], final: list[np.ndarray], teacher: list[np.ndarray], reps: int = 2000,
                seed: int = 0) -> tuple[float, float]:
    """Percentile 95% CI of G = mean_s(final - base) / mean_s(teacher - base): seeds drawn with replacement, then
    questions within each (the same for the three)."""
    rng = np.random.default_rng(seed)
    out = np.empty(reps)
    for k in range(reps):
        gained, gap = [], []
        for s in rng.integers(0, len(base), len(base)):
            j = rng.integers(0, len(base[s]), len(base[s]))
            gained.append(final[s][j].mean() - base[s][j].mean())
            gap.append(teacher[s][j].mean() - base[s][j].mean())
        out[k] = np.mean(gained) / np.mean(gap) if np.mean(gap) else np.nan
    lo, hi = np.nanquantile(out, [0.025, 0.975])
    return float(lo), float(hi)


def analyse(root: Path, name: str, arms: list[str], seeds: list[int], last: int = 3) -> dict:
    """The statistics of module docstring for the runs NAME-ARM-sSEED, at step `last` (the pre-registered final
    step); a run that has not reached it, or has no teacher evaluation or no accuracy, is left out and named."""
    from opd_tasks.stats import bootstrap_ci, paired_t

    runs = {(arm, s): f"{name}-{arm}-s{s}" for arm in arms for s in seeds}
    evals = read_evals(root, list(runs.values()))
    result: dict = {"root": str(root), "name": name, "final_step": last, "arms": {}, "left_out": {}}
    for run in runs.values():
        steps = evals.get(run)
        why = ("not run" if steps is None else f"reached step {max(steps)}" if max(steps) < last
               else "no teacher_eval (gates.min_headroom null)" if -1 not in steps
               else "no accuracy (prompt-only data)" if step_figures(steps[0])["accuracy"] is None else None)
        if why is not None:
            result["left_out"][run] = why
            evals.pop(run, None)
    for arm in arms:
        mine = {s: evals[runs[(arm, s)]] for s in seeds if runs[(arm, s)] in evals}
        if not mine:
            result["arms"][arm] = {"seeds": []}
            continue
        per_seed, base_v, final_v, teacher_v = {}, [], [], []
        for s, steps in mine.items():
            ids = sorted(steps[0])
            if any(sorted(steps[k]) != ids for k in steps):
                raise ValueError(f"{runs[(arm, s)]}: its evaluations are not all on the same questions")
            figures = {str(k): step_figures(steps[k]) for k in sorted(steps) if k >= 0}
            teacher = step_figures(steps[-1])["accuracy"]
            acc0, acc = figures["0"]["accuracy"], figures[str(last)]["accuracy"]
            per_seed[str(s)] = {"steps": figures, "teacher_accuracy": teacher,
                                "gap_closed": (acc - acc0) / (teacher - acc0) if teacher != acc0 else None,
                                "rkl_falls": figures[str(last)]["rkl_per_token"] < figures["0"]["rkl_per_token"],
                                "rkl_per_sequence_falls": figures[str(last)]["rkl_per_sequence"]
                                < figures["0"]["rkl_per_sequence"]}
            vec = [np.array([float(steps[k][p][0]) for p in ids]) for k in (0, last, -1)]
            base_v.append(vec[0])
            final_v.append(vec[1])
            teacher_v.append(vec[2])
        gs = [v["gap_closed"] for v in per_seed.values() if v["gap_closed"] is not None]
        gain_ci = bootstrap_ci(base_v, final_v)
        g_mean = statistics.mean(gs) if gs else None
        result["arms"][arm] = {
            "seeds": sorted(mine), "per_seed": per_seed,
            "gap_closed_mean": g_mean, "gap_closed_ci95": g_bootstrap(base_v, final_v, teacher_v),
            "gain_mean": statistics.mean(float(f.mean() - b.mean()) for b, f in zip(base_v, final_v, strict=True)),
            "gain_ci95": gain_ci, "r1_holds": g_mean is not None and g_mean >= 0.5 and gain_ci[0] > 0,
            "r2_holds": all(v["rkl_falls"] for v in per_seed.values()),
        }
    ran = [arm for arm in arms if result["arms"][arm].get("seeds")]
    if "opd" in ran:
        for arm in (x for x in ran if x != "opd"):
            both = sorted(set(result["arms"]["opd"]["seeds"]) & set(result["arms"][arm]["seeds"]))
            final = {x: [result["arms"][x]["per_seed"][str(s)]["steps"][str(last)]["accuracy"] for s in both]
                     for x in ("opd", arm)}
            entry = {"seeds": both, "diff_by_seed": [b - o for o, b in zip(final["opd"], final[arm], strict=True)]}
            if len(both) >= 2:
                t = paired_t(final["opd"], final[arm])
                entry |= {"mean_diff": t.mean, "t_ci95": list(t.ci95)}
            result.setdefault("comparisons", {})[f"{arm} - opd"] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench real_experiment", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="Storage root (default: $OPD_HOME, .opd).")
    ap.add_argument("--name", default="real-ctx")
    ap.add_argument("--arms", default="opd,topd-window")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "real_experiment.json")
    args = ap.parse_args(argv)
    from opd_tasks.stages.evaluate import nats, percent
    from storage.layout import Layout

    root = Layout(args.root).root
    result = analyse(root, args.name, args.arms.split(","), [int(s) for s in args.seeds.split(",")])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for arm, a in result["arms"].items():
        if not a["seeds"]:
            print(f"{arm}: no complete run")
            continue
        for s, v in a["per_seed"].items():
            curve = " -> ".join(percent(f["accuracy"]) for f in v["steps"].values())
            rkl = " -> ".join(nats(f["rkl_per_token"]) for f in v["steps"].values())
            per_answer = " -> ".join(nats(f["rkl_per_sequence"]) for f in v["steps"].values())
            print(f"{arm} seed {s}: accuracy {curve} (teacher {percent(v['teacher_accuracy'])}); reverse KL "
                  f"{rkl} nats/token, {per_answer} nats/answer; gap closed {v['gap_closed']}")
        print(f"{arm}: gap closed {a['gap_closed_mean']} (95% CI {a['gap_closed_ci95'][0]:.2f} to "
              f"{a['gap_closed_ci95'][1]:.2f}); gain {100 * a['gain_mean']:.1f} points (95% CI "
              f"{100 * a['gain_ci95'][0]:.1f} to {100 * a['gain_ci95'][1]:.1f}); R1 {a['r1_holds']}, "
              f"R2 {a['r2_holds']}")
    for run, why in result["left_out"].items():
        print(f"left out: {run}: {why}")
    for label, c in result.get("comparisons", {}).items():
        print(f"{label}: {c}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
