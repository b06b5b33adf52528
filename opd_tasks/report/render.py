"""The report's pages: tables, token examples, the HTML (images inlined) and the markdown."""

from __future__ import annotations

import base64
import html
import statistics
import time
from pathlib import Path
from typing import Any

from opd_tasks.errors import OpdError
from opd_tasks.report.figures import REGIME_COLORS
from opd_tasks.report.queries import RunInfo, query_rows
from opd_tasks.stages.evaluate import percent


def _pct(v) -> str:
    return percent(v, missing="-")


def _num(v, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def summary_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    head = ["method", "runs (seeds)", "baseline", "final accuracy (per sample), mean", "min-max",
            "learning-curve area", "reverse KL to the teacher (nats / token), baseline -> final",
            "surface share of high-loss tokens (of probed ones)", "s / iteration"]
    rows = []
    for m, s in summary["methods"].items():
        rows.append([m, f"{s['runs']} ({', '.join(map(str, s['seeds']))})", _pct(s["baseline_mean"]),
                     _pct(s["final_mean"]), f"{_pct(s['final_min'])}-{_pct(s['final_max'])}", _pct(s["area_mean"]),
                     f"{_num(s['rkl_baseline_mean'], '{:.3f}')} -> {_num(s['rkl_final_mean'], '{:.3f}')}",
                     f"{_pct(s['surface_share'])} ({_pct(s['surface_share_classified'])})" if s["surface_share"]
                     is not None else "-",
                     _num(s["seconds_per_iteration"], "{:.1f}")])
    return head, rows


PAIRED_NOTE = ("Per seed, the two methods share the eval set, the prompts and the sampling stream; the differences "
               "(in points) are per-seed paired, tested with a paired t-test and a Wilcoxon signed-rank test, and the "
               "final accuracy's 95% CI is also bootstrapped over seeds, then problems. The learning-curve area is "
               "the mean accuracy over the iterations; the early-stop rate is the share of evaluated answers that "
               "stop before the last step (the testbed's consequential fork; lower is better).")


def comparison_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """One row per method pair and metric: the paired difference (points) and its tests."""
    head = ["comparison", "metric", "seeds", "mean difference", "95% CI (t)", "95% CI (bootstrap)", "paired t p",
            "Wilcoxon p"]
    rows = []
    names = {"final": "final accuracy", "area": "learning-curve area", "early_stop": "final early-stop rate"}
    for c in summary.get("comparisons", []):
        for metric, label in names.items():
            e = c[metric]
            if not e["seeds"]:
                continue
            ci = e.get("t_ci95")
            boot = e.get("bootstrap_ci95")
            rows.append([f"{c['b']} - {c['a']}", label,
                         str(len(e["seeds"])), _num(e.get("mean_diff") and 100 * e["mean_diff"], "{:+.1f}"),
                         f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "-",
                         f"[{100 * boot[0]:+.1f}, {100 * boot[1]:+.1f}]" if boot else "-",
                         _num(e.get("t_p"), "{:.3g}"), _num(e.get("wilcoxon_p"), "{:.3g}")])
    return head, rows


def _detail_rows(data: dict, summary: dict) -> tuple[list[str], list[list[str]]]:
    """Per method: cost per iteration and per kept token, the early-stop rate per step (mean over seeds), and the
    detector against the premature stops."""
    head = ["method", "s / iteration", "kept tokens / iteration", "ms / kept token", "early-stop rate by step",
            "forks examined", "fork AUC", "fork recall"]
    forks = {f["method"]: f for f in data.get("forks", [])}
    rows = []
    for m, s in summary["methods"].items():
        by_step: dict[int, list[float]] = {}
        for e in data.get("early_stops", []):
            if e["method"] == m:
                by_step.setdefault(e["step"], []).append(e["rate"])
        curve = " ".join(f"{100 * statistics.mean(v):.1f}" for _, v in sorted(by_step.items())) or "-"
        f = forks.get(m, {})
        rows.append([m, _num(s["seconds_per_iteration"], "{:.1f}"), _num(s["kept_tokens_per_iteration"], "{:.0f}"),
                     _num(s["seconds_per_kept_token"] and 1000 * s["seconds_per_kept_token"], "{:.2f}"), curve,
                     str(f.get("forks", "-")), _num(f.get("fork_auc"), "{:.3f}"), _num(f.get("fork_recall"))])
    return head, rows


def _environment_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """The libraries and devices that computed the runs' artifacts (their manifests' provenance)."""
    return ["libraries and device", "artifacts"], [[e["computed_with"], str(e["artifacts"])]
                                                   for e in data.get("environments", [])]


def _classifier_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    head = ["method", "iteration", "classified", "surface P", "surface R", "divergent P", "divergent R"]
    rows = [[c["method"], str(c["iteration"]), str(c["classified"]), _num(c["surface_precision"]),
             _num(c["surface_recall"]), _num(c["divergent_precision"]), _num(c["divergent_recall"])]
            for c in data["classifier"]]
    return head, rows


def _html_table(head, rows) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(head, rows) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |"
                                                                                  for r in esc])


def _show(s: str) -> str:
    return s.replace("\n", "\\n")


def examples(data: dict, runs: list[RunInfo], k: int = 3, root: Path | None = None) -> dict[str, Any] | None:
    """Token examples from the first run that ran the analysis (TOPD preferred), at its first iteration; the
    student's tokenizer decodes them (`root`: where an `imported:` student is)."""
    con = data["_con"]
    analysed = {r[0] for r in con.execute("SELECT DISTINCT run FROM tokens").fetchall()}
    cands = [r for r in runs if r.run in analysed]
    if not cands or k <= 0:
        return None
    cands.sort(key=lambda r: (r.method != "topd", r.seed, r.run))
    pick = cands[0]
    iteration = con.execute("SELECT min(iteration) FROM tokens WHERE run = ?", [pick.run]).fetchone()[0]
    rows = query_rows(con, "examples", {"run": pick.run, "iteration": iteration, "k": k})
    from opd_tasks.config import ModelRef
    from opd_tasks.models import load_tokenizer

    try:
        tok = load_tokenizer(ModelRef.model_validate(pick.config["models"]["student"]), root)
    except (OpdError, OSError, ValueError):  # the model moved or is gone: show token ids instead of text
        tok = None

    def text(ids) -> str:
        if ids is None:
            return ""
        return tok.decode(list(ids), skip_special_tokens=False) if tok is not None else " ".join(
            f"[{i}]" for i in ids)

    seqs: list[dict] = []
    for r in rows:
        if not seqs or (seqs[-1]["prompt_id"], seqs[-1]["sample_id"]) != (r["prompt_id"], r["sample_id"]):
            seqs.append({"prompt_id": r["prompt_id"], "sample_id": r["sample_id"], "prompt": r["prompt"] or "",
                         "tokens": []})
        seqs[-1]["tokens"].append({
            "text": text([r["token_id"]]), "pos": r["pos"], "regime": r["regime"], "role": r["role"],
            "k1": r["k1"], "d": r["near_future_div"], "weight": r["weight"],
            "teacher": text(r["teacher_continuation"]) if r["teacher_continuation"] is not None else None,
            "student": text(r["student_continuation"]) if r["student_continuation"] is not None else None,
            "distance": r["distance"],
        })
    return {"run": pick.run, "method": pick.method, "iteration": iteration, "sequences": seqs}


def _examples_html(ex: dict | None) -> str:
    if ex is None:
        return "<p>No run in this report ran the analysis stage, so there are no token examples.</p>"
    parts = [f"<p>Run <code>{html.escape(ex['run'])}</code> ({html.escape(ex['method'])}), iteration "
             f"{ex['iteration']}: the rollouts with the most classified high-loss tokens. Hover a token for its "
             "k1, near-future divergence D, weight and ground-truth role. "
             + "".join(f'<span class="tok {r}">{r}</span> ' for r in REGIME_COLORS) + "</p>"]
    for s in ex["sequences"]:
        toks = []
        for t in s["tokens"]:
            title = (f"pos {t['pos']} | regime {t['regime']} | role {t['role']} | k1 {_num(t['k1'], '{:.3f}')} | "
                     f"D {_num(t['d'], '{:.3f}')} | weight {_num(t['weight'], '{:.2f}')}")
            span = (f'<span class="tok {html.escape(t["regime"])}" title="{html.escape(title)}">'
                    f"{html.escape(_show(t['text']))}</span>")
            if t["teacher"] is not None:
                span += f'<span class="probe">[{html.escape(_probe_text(t))}]</span>'
            toks.append(span)
        parts.append(f'<div class="ex"><div class="prompt">{html.escape(_show(s["prompt"]))}</div>'
                     f'<div class="completion">{"".join(toks)}</div></div>')
    return "\n".join(parts)


def _probe_text(t: dict) -> str:
    """A probed position's continuations and distance: both continuations (probe detector), or with the swap
    detector the teacher's bridge continuation where there is one."""
    parts = []
    if t["teacher"]:
        parts.append(f"teacher: {_show(t['teacher'])}")
    if t["student"]:
        parts.append(f"student: {_show(t['student'])}")
    return " | ".join([*parts, f"D {_num(t['distance'], '{:.2f}')}"])


def _examples_md(ex: dict | None) -> str:
    if ex is None:
        return "No run in this report ran the analysis stage, so there are no token examples."
    lines = [f"Run `{ex['run']}` ({ex['method']}), iteration {ex['iteration']}. Marks: `[s:tok]` surface, "
             "`[D:tok]` divergent, `[u:tok]` unprobed high-loss token; `{teacher: ... | student: ... | D ...}` at a "
             "probed position: the continuations (probe detector; with swap, the teacher's bridge at divergent "
             "positions only) and the near-future divergence.", ""]
    marks = {"surface": "s", "divergent": "D", "unprobed": "u"}
    for s in ex["sequences"]:
        out = []
        for t in s["tokens"]:
            txt = _show(t["text"])
            out.append(f"[{marks[t['regime']]}:{txt}]" if t["regime"] in marks else txt)
            if t["teacher"] is not None:
                out.append(f"{{{_probe_text(t)}}}")
        lines += ["```", _show(s["prompt"]) + " " + "".join(out), "```", ""]
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555}
.verdict{padding:.8em 1em;border-left:4px solid #888;background:#f7f7f7}
.ex{font-family:ui-monospace,Menlo,monospace;font-size:13px;margin:.8em 0;padding:.5em;border:1px solid #eee}
.prompt{color:#777}.completion{overflow-wrap:anywhere}.tok{white-space:pre-wrap}.tok.surface{background:#8ecae6}.tok.divergent{background:#e76f51;
color:#fff}.tok.unprobed{background:#e9c46a}.probe{font-size:11px;color:#264653;background:#eef;margin:0 3px;
white-space:pre-wrap}code{background:#f3f3f3;padding:0 3px}
"""


def render(title: str, runs: list[RunInfo], data: dict, summary: dict, figs: list[dict], ex: dict | None,
           out: Path, command: str | None) -> tuple[str, str]:
    """(html, markdown) of the report; the html embeds each PNG as a data URI."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sh, sr = summary_table(summary)
    ph, pr = comparison_table(summary)
    dh, dr = _detail_rows(data, summary)
    ch, cr = _classifier_rows(data)
    v = summary["verdict"]
    vtext = v["text"] if v else "No TOPD/OPD pair in these runs: no verdict."
    runs_line = ", ".join(f"{r.run} ({r.method}, seed {r.seed})" for r in runs)
    h = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
         f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
         f"<p>{stamp}. Runs: {html.escape(runs_line)}.</p>"]
    if command:
        h.append(f"<p>Made by <code>{html.escape(command)}</code></p>")
    h += [f'<p class="verdict">{html.escape(vtext)}</p>', "<h2>Summary</h2>", _html_table(sh, sr)]
    if summary.get("note"):
        h.append(f"<p><b>Note:</b> {html.escape(summary['note'])}.</p>")
    if pr:
        h += ["<h2>Paired comparisons</h2>", f"<p>{html.escape(PAIRED_NOTE)}</p>", _html_table(ph, pr)]
    h += ["<h2>Cost, early stops, forks</h2>", _html_table(dh, dr)]
    eh, er = _environment_rows(data)
    h += ["<h2>Computed with</h2>", _html_table(eh, er)]
    for f in figs:
        b64 = base64.b64encode((out / f["file"]).read_bytes()).decode()
        h.append(f'<figure><img alt="{html.escape(f["file"])}" src="data:image/png;base64,{b64}">'
                 f"<figcaption>{html.escape(f['caption'])}</figcaption></figure>")
    if cr:
        h += ["<h2>Regime classifier vs ground truth</h2>", _html_table(ch, cr)]
    h += ["<h2>Token examples</h2>", _examples_html(ex),
          "<h2>Queries</h2><p>Every figure comes from the SQL in <code>opd_tasks/report_sql/</code> "
          "(accuracy, problems, regimes, classifier, forks, costs, kept, examples) over the storage views, and the "
          "early-stop rates from the evaluations' manifests; rerun any query with "
          "<code>opd sql</code>. The data behind this page is in <code>report.json</code>.</p></body></html>"]
    md = [f"# {title}", "", f"{stamp}. Runs: {runs_line}.", ""]
    if command:
        md += [f"Made by `{command}`", ""]
    md += [f"**{vtext}**", "", "## Summary", "", _md_table(sh, sr), ""]
    if summary.get("note"):
        md += [f"Note: {summary['note']}.", ""]
    if pr:
        md += ["## Paired comparisons", "", PAIRED_NOTE, "", _md_table(ph, pr), ""]
    md += ["## Cost, early stops, forks", "", _md_table(dh, dr), ""]
    md += ["## Computed with", "", _md_table(eh, er), ""]
    md += [f"![{f['file']}]({f['file']})\n\n{f['caption']}\n" for f in figs]
    if cr:
        md += ["## Regime classifier vs ground truth", "", _md_table(ch, cr), ""]
    md += ["## Token examples", "", _examples_md(ex), "",
           "Figures come from the SQL in `opd_tasks/report_sql/` over the storage views.", ""]
    return "\n".join(h), "\n".join(md)
