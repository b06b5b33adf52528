"""How well a testbed teacher reads each surface style: teacher-forced next-token argmax accuracy and NLL on
the reasoning, answer and form tokens of CORRECT completions (validation problems) rendered in a given style.

A teacher that breaks down after phrasing it never saw gives a bad OPD signal on the tokens that follow
(docs/testbed.md, docs/results.md). Compare the committed teacher with one trained on `teacher_broad`:

    opd bootstrap --out /tmp/broad --teacher-style teacher_broad
    python -m bench teacher_styles --teacher committed=testbed:teacher --teacher broad=/tmp/broad/teacher
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from bench.common import save

console = Console(width=160)


def measure(path: str, problems, styles: dict, seed: int = 0) -> dict:
    import torch

    from opd_tasks.config import ModelRef
    from opd_tasks.models import load_model, load_tokenizer
    from opd_tasks.testbed.labeler import label_token_ids
    from opd_tasks.testbed.task import render_completion, seeded_rng

    ref = ModelRef(path=path)
    tok, model = load_tokenizer(ref), load_model(ref, "cpu")
    model.eval()
    out = {}
    for sname, style in styles.items():
        rng = seeded_rng("bench-teacher-styles", sname, seed)
        stats = {r: [0, 0, 0.0] for r in ("reasoning", "answer", "form")}
        with torch.no_grad():
            for p in problems:
                pr = tok(p.prompt).input_ids
                comp = tok(render_completion(p, style, rng), add_special_tokens=False).input_ids
                logp = torch.log_softmax(model(torch.tensor([pr + comp])).logits[0, len(pr) - 1:-1].float(), -1)
                for i, (t, role) in enumerate(zip(comp, label_token_ids(tok, comp), strict=True)):
                    if role in stats:
                        s = stats[role]
                        s[0] += 1
                        s[1] += int(logp[i].argmax().item() == t)
                        s[2] -= logp[i, t].item()
        out[sname] = {r: {"tokens": s[0], "argmax_accuracy": s[1] / s[0], "nll": s[2] / s[0]}
                      for r, s in stats.items() if s[0]}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench teacher_styles", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", action="append", default=None, help="NAME=PATH (repeatable); default: "
                    "committed=testbed:teacher")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--tag", default=None, help="results go to bench/results/teacher-styles[-TAG].json")
    args = ap.parse_args(argv)
    from opd_tasks.config import TestbedTaskConfig
    from opd_tasks.testbed.styles import Style, get_style
    from opd_tasks.testbed.task import generate_problems

    teachers = dict(t.split("=", 1) for t in (args.teacher or ["committed=testbed:teacher"]))
    problems = generate_problems(TestbedTaskConfig(), "validation", args.problems, seed=0)
    unseen = Style("unseen", {" and ": 1.0}, {"therefore": 1.0}, {"= {ans}": 1.0})
    styles = {"teacher favourites (; so N.)": get_style("plain"), "student": get_style("student"),
              "never in the committed teacher's data (and therefore =N)": unseen}
    res = {name: measure(path, problems, styles) for name, path in teachers.items()}
    t = Table("teacher", "style of the completion", "reasoning: argmax / NLL", "answer: argmax / NLL",
              "form: argmax / NLL", title="teacher-forced next-token accuracy on correct completions")
    for name, per in res.items():
        for sname, roles in per.items():
            t.add_row(name, sname, *(f"{roles[r]['argmax_accuracy']:.1%} / {roles[r]['nll']:.2f}" if r in roles
                                     else "-" for r in ("reasoning", "answer", "form")))
    console.print(t)
    name = "teacher-styles" + (f"-{args.tag}" if args.tag else "")
    console.print(f"results: {save(name, {'args': vars(args), 'teachers': teachers, 'results': res})}")
    return res


if __name__ == "__main__":
    main()
