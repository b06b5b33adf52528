"""Bootstrap the embedded testbed: tokenizer, teacher and student, trained from scratch on two CPU cores.

    python -m opd_tasks.testbed.bootstrap --out DIR [--quick] [--seed 0]

writes DIR/tokenizer/, DIR/teacher/, DIR/student/ (each loadable with AutoTokenizer /
AutoModelForCausalLM.from_pretrained; the model dirs hold the tokenizer files too) and DIR/bootstrap.json
(accuracies, seconds, steps, seed, config, versions). The committed copy lives in opd_tasks/testbed/assets/.

- Teacher: 1.08M-parameter Llama, SFT on `teacher`-style text for `teacher_steps` steps (OneCycle, lr 2e-3).
- Student: 0.28M-parameter Llama, SFT on `student`-style text; every 25 steps its greedy accuracy on 200
  validation problems is measured and training stops once it reaches `student_target` (default 0.3), so the
  initial student is weak by construction (room to learn) yet not hopeless; at most `student_steps` steps.
- Both are scored on `eval_size` test problems (greedy, exact match of the final answer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a program: before torch loads OpenMP (docs/testbed.md, OMP_WAIT_POLICY)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from opd_tasks.config import TestbedTaskConfig  # noqa: E402
from opd_tasks.testbed.modeling import STUDENT_SHAPE, TEACHER_SHAPE, make_model  # noqa: E402
from opd_tasks.testbed.styles import get_style  # noqa: E402
from opd_tasks.testbed.task import generate_problems, longest_completion  # noqa: E402
from opd_tasks.testbed.tokenizer import save_tokenizer  # noqa: E402
from opd_tasks.testbed.train import accuracy, sft  # noqa: E402

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULTS: dict[str, Any] = dict(teacher_steps=1200, student_steps=1500, student_target=0.3, eval_size=500)
QUICK: dict[str, Any] = dict(teacher_steps=60, student_steps=40, student_target=0.3, eval_size=20)


def bootstrap(
    out_dir: str | Path,
    task: TestbedTaskConfig | None = None,
    seed: int = 0,
    teacher_steps: int = DEFAULTS["teacher_steps"],
    student_steps: int = DEFAULTS["student_steps"],
    progress: bool = True,
    student_target: float | None = DEFAULTS["student_target"],
    eval_size: int = DEFAULTS["eval_size"],
    batch_size: int = 64,
    lr: float = 2e-3,
) -> dict[str, Any]:
    """Build the tokenizer, train teacher and student, write them under `out_dir`, return bootstrap.json.

    `task` defaults to `TestbedTaskConfig()` (its styles name the teacher's and student's training styles).
    `student_target`: stop the student once its validation accuracy reaches it (None: train all steps).
    Deterministic for a given seed on a given machine (CPU, 2 threads); accuracies reproduce within a
    few points elsewhere.
    """
    task = task or TestbedTaskConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))  # the calibrated setting; restored at the end
    t_start = time.perf_counter()
    tok = save_tokenizer(out / "tokenizer")
    max_new = len(tok(longest_completion(task), add_special_tokens=False).input_ids) + 8
    test = generate_problems(task, "test", eval_size, seed=seed)
    val = generate_problems(task, "validation", 200, seed=seed)
    report: dict[str, Any] = {"seed": seed, "task": task.model_dump(), "eval_size": eval_size}

    teacher = make_model(tok, "teacher", seed=seed)
    res = sft(
        teacher,
        tok,
        task,
        get_style(task.teacher_style),
        teacher_steps,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        progress=progress,
        desc="teacher",
    )
    t0 = time.perf_counter()
    report["teacher"] = {
        "style": task.teacher_style,
        "shape": TEACHER_SHAPE,
        "params": teacher.num_parameters(),
        "steps": res.steps,
        "train_seconds": round(res.seconds, 1),
        "final_loss": round(res.final_loss, 4),
        "test_accuracy": accuracy(teacher, tok, test, max_new),
    }
    report["teacher"]["eval_seconds"] = round(time.perf_counter() - t0, 1)
    _save(teacher, tok, out / "teacher")

    student = make_model(tok, "student", seed=seed + 1)
    trace: list[tuple[int, float]] = []

    def stop_at_target(step: int) -> bool:
        acc = accuracy(student, tok, val, max_new)
        student.train()
        trace.append((step, acc))
        return student_target is not None and acc >= student_target

    res = sft(
        student,
        tok,
        task,
        get_style(task.student_style),
        student_steps,
        seed=seed + 1,
        batch_size=batch_size,
        lr=lr,
        progress=progress,
        desc="student",
        callback=stop_at_target,
        callback_every=25,
    )
    t0 = time.perf_counter()
    report["student"] = {
        "style": task.student_style,
        "shape": STUDENT_SHAPE,
        "params": student.num_parameters(),
        "steps": res.steps,
        "max_steps": student_steps,
        "target_validation_accuracy": student_target,
        "stopped_at_target": res.stopped_early,
        "validation_trace": trace,
        "train_seconds": round(res.seconds, 1),
        "final_loss": round(res.final_loss, 4),
        "test_accuracy": accuracy(student, tok, test, max_new),
    }
    report["student"]["eval_seconds"] = round(time.perf_counter() - t0, 1)
    _save(student, tok, out / "student")

    report.update(
        total_seconds=round(time.perf_counter() - t_start, 1),
        batch_size=batch_size,
        lr=lr,
        max_new_tokens=max_new,
        loss="cross-entropy on completion tokens + EOS (prompt masked)",
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        threads=min(2, threads),
    )
    (out / "bootstrap.json").write_text(json.dumps(report, indent=2) + "\n")
    torch.set_num_threads(threads)
    return report


#: The mechanism switch's models (docs/testbed.md): the teacher and one student per fork, under ASSETS_DIR / "fork".
FORK_STUDENTS = {"consequential": "student_consequential", "harmless": "student_harmless"}
FORK_DEFAULTS: dict[str, Any] = dict(teacher_steps=600, student_steps=1500, student_target=0.45, eval_size=500)


def bootstrap_fork(out_dir: str | Path, seed: int = 0, teacher_steps: int = FORK_DEFAULTS["teacher_steps"],
                   student_steps: int = FORK_DEFAULTS["student_steps"],
                   student_target: float = FORK_DEFAULTS["student_target"],
                   eval_size: int = FORK_DEFAULTS["eval_size"], progress: bool = True, batch_size: int = 64,
                   lr: float = 2e-3, teacher_lr: float = 1e-3) -> dict[str, Any]:
    """The models of the mechanism switch: `teacher/` (the committed teacher fine-tuned on `teacher_fork`, which reads
    every phrasing and rarely takes either fork) and `student-<fork>/` for each fork (trained from scratch like the
    committed student, on its fork style, until its greedy validation accuracy reaches `student_target`, so the
    students start equal). bootstrap.json records what docs/testbed.md reports: the accuracies, the sampled
    early-stop rate and the immediate k1 of fork, filler and style tokens under this teacher."""
    from opd_tasks.config import ModelRef
    from opd_tasks.models import load_model

    task = TestbedTaskConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    t_start = time.perf_counter()
    tok = save_tokenizer(out / "tokenizer")
    max_new = len(tok(longest_completion(task), add_special_tokens=False).input_ids) + 8
    test = generate_problems(task, "test", eval_size, seed=seed)
    val = generate_problems(task, "validation", 200, seed=seed)
    report: dict[str, Any] = {"seed": seed, "eval_size": eval_size, "students": {}}

    teacher = load_model(ModelRef(path="testbed:teacher"))
    res = sft(teacher, tok, task, get_style("teacher_fork"), teacher_steps, seed=seed, batch_size=batch_size,
              lr=teacher_lr, progress=progress, desc="teacher (fork)")
    report["teacher"] = {"style": "teacher_fork", "from": "testbed:teacher", "steps": res.steps, "lr": teacher_lr,
                         "train_seconds": round(res.seconds, 1), "final_loss": round(res.final_loss, 4),
                         "test_accuracy": accuracy(teacher, tok, test, max_new)}
    _save(teacher, tok, out / "teacher")
    for fork, style in FORK_STUDENTS.items():
        student = make_model(tok, "student", seed=seed + 1)
        trace: list[tuple[int, float]] = []

        def stop_at_target(step: int, student=student, trace=trace) -> bool:
            acc = accuracy(student, tok, val, max_new)
            student.train()
            trace.append((step, acc))
            return acc >= student_target

        # checked every 10 steps: accuracy climbs steeply near the target (0.16 -> 0.45 in 25 steps was seen)
        res = sft(student, tok, task, get_style(style), student_steps, seed=seed + 1, batch_size=batch_size, lr=lr,
                  progress=progress, desc=f"student ({fork})", callback=stop_at_target, callback_every=10)
        report["students"][fork] = {"style": style, "steps": res.steps, "validation_trace": trace,
                                    "train_seconds": round(res.seconds, 1), "test_accuracy":
                                    accuracy(student, tok, test, max_new)} | fork_figures(student, teacher, tok,
                                                                                          test[:100], max_new)
        _save(student, tok, out / f"student-{fork}")
    report.update(total_seconds=round(time.perf_counter() - t_start, 1), batch_size=batch_size, lr=lr,
                  max_new_tokens=max_new, versions={"torch": torch.__version__,
                                                    "transformers": transformers.__version__})
    (out / "bootstrap.json").write_text(json.dumps(report, indent=2) + "\n")
    torch.set_num_threads(threads)
    return report


#: Style tokens: the slot variants that are one token (separators, connectives).
_STYLE_TOKENS = {" ;", " ,", " then", " and", " so", " thus", " hence", " therefore"}


@torch.no_grad()
def fork_figures(student, teacher, tok, problems, max_new: int, samples: int = 4) -> dict[str, Any]:
    """On `samples` sampled completions (temperature 1) of each problem: the share that stop early, the sampled
    accuracy, and the mean immediate k1 = log p_S - log p_T of fork, filler and style tokens (and of reasoning
    and answer digits for scale), with their counts."""
    from opd_tasks.backends.hf import generate, score_sequences
    from opd_tasks.checkers import check_testbed
    from opd_tasks.testbed.labeler import label_token_ids

    prompts = [tok(p.prompt).input_ids for p in problems]
    gens = generate(student, prompts, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, n=samples,
                    temperature=1.0, max_new_tokens=max_new, seed=0, progress=False)
    scored = score_sequences(teacher, [prompts[g.prompt_index] for g in gens], [g.token_ids for g in gens],
                             pad_token_id=tok.pad_token_id, top_k=1, progress=False)
    k1: dict[str, list[float]] = {k: [] for k in ("fork", "filler", "style", "reasoning", "answer")}
    stops = correct = 0
    for g, t in zip(gens, scored, strict=True):
        roles = label_token_ids(tok, g.token_ids, prompts[g.prompt_index])
        stops += "fork" in roles
        correct += check_testbed(tok.decode(g.token_ids, skip_special_tokens=True), problems[g.prompt_index].answer)
        for role, piece, s_lp, t_lp in zip(roles, tok.convert_ids_to_tokens(g.token_ids), g.logprobs, t.logprob,
                                           strict=True):
            group = "style" if role == "form" and piece in _STYLE_TOKENS else role
            if group in k1:
                k1[group].append(s_lp - t_lp)
    return {"sampled_early_stop_rate": stops / len(gens), "sampled_accuracy": correct / len(gens),
            "k1": {k: {"mean": round(sum(v) / len(v), 3), "tokens": len(v)} for k, v in k1.items() if v}}


def _save(model: transformers.PreTrainedModel, tok: Any, path: Path) -> None:
    model.to(torch.float32).save_pretrained(str(path), safe_serialization=True)
    save_tokenizer(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opd_tasks.testbed.bootstrap", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help=f"output dir (the committed models are in {ASSETS_DIR}; --fork: "
                                                 "its fork/ dir)")
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test; weak models)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-steps", type=int)
    ap.add_argument("--student-steps", type=int)
    ap.add_argument("--teacher-style", default="teacher", help="style the teacher trains on (styles.py), e.g. "
                                                                "teacher_broad")
    ap.add_argument("--student-style", default="student", help="style the student trains on (styles.py)")
    ap.add_argument("--fork", action="store_true", help="build the mechanism switch's models instead (the committed "
                                                        "teacher fine-tuned, one student per fork; docs/testbed.md)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.fork:
        out = Path(args.out)
        report = bootstrap_fork(out, seed=args.seed, progress=not args.no_progress)
        report["command"] = ("python -m opd_tasks.testbed.bootstrap "
                             + " ".join(argv if argv is not None else sys.argv[1:]))
        (out / "bootstrap.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: report[k] for k in ("teacher", "students", "total_seconds")}, indent=2))
        return 0
    task = TestbedTaskConfig(teacher_style=args.teacher_style, student_style=args.student_style)
    get_style(task.teacher_style), get_style(task.student_style)  # a bad name fails now, not after training
    kw = dict(QUICK if args.quick else DEFAULTS)
    if args.teacher_steps is not None:
        kw["teacher_steps"] = args.teacher_steps
    if args.student_steps is not None:
        kw["student_steps"] = args.student_steps
    report = bootstrap(args.out, task=task, seed=args.seed, progress=not args.no_progress, **kw)
    report["command"] = "python -m opd_tasks.testbed.bootstrap " + " ".join(argv if argv is not None else sys.argv[1:])
    (Path(args.out) / "bootstrap.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("teacher", "student", "total_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
