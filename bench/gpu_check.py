"""GPU check of the `hf` backend (run on a CUDA machine): the stages on CUDA, CPU-vs-CUDA parity, and the
cost of an `opd` vs a `topd` iteration, side by side. Needs only torch/transformers/pyarrow/pydantic/yaml.

    python -m bench.gpu_check --out results.json [--iterations 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--root", default="/tmp/opd-gpu-check")
    ap.add_argument("--device", default="cuda", help="cpu only to dry-run this script")
    ap.add_argument("--prompts", type=int, default=64)
    args = ap.parse_args(argv)
    from opd_tasks.backends.hf import load_causal_lm, score_sequences
    from opd_tasks.config import load_config
    from opd_tasks.pipeline import resolve_models, run_plain
    from storage.lineage import RunLineage
    from storage.store import ArtifactStore

    res: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": platform.python_version()}
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name(0)
    import transformers

    res["transformers"] = transformers.__version__
    runs = {}
    for method in ("opd", "topd"):
        cfg = load_config(
            None,
            [
                f"method={method}",
                f"device={args.device}",
                f"root={args.root}/{method}",
                f"name=gpu-{method}",
                f"iterations={args.iterations}",
                f"data.prompts_per_iteration={args.prompts}",
                "rollout.samples_per_prompt=8",
                "rollout.batch_size=512",
                "scoring.batch_size=256",
            ],
        )
        t0 = time.perf_counter()
        out = run_plain(cfg, log=lambda m: print(m, flush=True), progress=False)
        st = ArtifactStore(out.root)
        tokens = [sum(len(t) for t in st.read_table(r.stages["rollout"].ref, "rollouts", columns=["token_ids"])
                      .column("token_ids").to_pylist()) for r in out.iterations]
        # completion tokens per second of each stage, iterations after the first (CUDA start-up excluded)
        later = list(zip(out.iterations, tokens, strict=True))[1:] or list(zip(out.iterations, tokens, strict=True))
        throughput = {k: float(np.median([n / r.stages[k].seconds for r, n in later]))
                      for k in ("rollout", "score", "analyze", "update") if k in out.iterations[0].stages}
        print(f"{method}: completion tokens/s per stage (median over iterations after the first): "
              + ", ".join(f"{k} {v:,.0f}" for k, v in throughput.items()), flush=True)
        runs[method] = {
            "tokens_per_iteration": tokens,
            "stage_tokens_per_s": throughput,
            "baseline": out.baseline_accuracy,
            "accuracy": [r.accuracy for r in out.iterations],
            "seconds_per_iteration": [sum(s.seconds for s in r.stages.values()) for r in out.iterations],
            "stage_seconds": [{k: round(s.seconds, 3) for k, s in r.stages.items()} for r in out.iterations],
            "total_s": time.perf_counter() - t0,
        }
        print(method, runs[method], flush=True)
    res["runs"] = runs
    # Cost of topd vs opd per iteration (median), on the same GPU in one process.
    med = {m: float(np.median(r["seconds_per_iteration"])) for m, r in runs.items()}
    res["topd_over_opd"] = med["topd"] / med["opd"]

    # Parity: the same rollout tokens scored by the teacher on CPU (fp32) and CUDA (fp32 and bf16).
    store = ArtifactStore(f"{args.root}/opd")
    lin = RunLineage(store.layout, "gpu-opd")
    roll = store.read_table(lin.get(0, "rollout").ref, "rollouts")
    prompts, comps = roll.column("prompt_token_ids").to_pylist()[:128], roll.column("token_ids").to_pylist()[:128]
    models = resolve_models(load_config())
    teacher = models.teacher
    ref_lp = None
    gpu = args.device
    for name, dev, dtype in (
        ("cpu-fp32", "cpu", "float32"),
        (f"{gpu}-fp32", gpu, "float32"),
        (f"{gpu}-bf16", gpu, "bfloat16"),
    ):
        m = load_causal_lm(teacher.path, torch.device(dev), dtype)
        sc = score_sequences(m, prompts, comps, pad_token_id=0, top_k=8, batch_size=64, progress=False)
        lp = np.concatenate([np.asarray(s.logprob) for s in sc])
        if ref_lp is None:
            ref_lp = lp
        else:
            res[f"parity_{name}_vs_cpu_max_abs"] = float(np.abs(lp - ref_lp).max())
            res[f"parity_{name}_vs_cpu_mean_abs"] = float(np.abs(lp - ref_lp).mean())
    # Sampling log-probs (CUDA generate, bf16) vs a CUDA fp32 teacher-forced recompute with the same student.
    sm = load_causal_lm(models.initial_student.path, torch.device(gpu), "float32")
    sc = score_sequences(sm, prompts, comps, pad_token_id=0, top_k=1, batch_size=64, progress=False)
    samp = np.concatenate([np.asarray(x) for x in roll.column("logprobs").to_pylist()[:128]])
    rec = np.concatenate([np.asarray(s.logprob) for s in sc])
    res["sampling_vs_recompute_max_abs"] = float(np.abs(samp - rec).max())
    res["sampling_vs_recompute_mean_abs"] = float(np.abs(samp - rec).mean())
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
    return res


if __name__ == "__main__":
    main()
