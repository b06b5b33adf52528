"""Stage 5, `evaluate`: accuracy of a checkpoint on held-out prompts (greedy; pass@k by sampling)."""

from __future__ import annotations

import pyarrow as pa

from opd_tasks.checkers import CHECKERS, extract_numeric_answer, extract_testbed_answer
from opd_tasks.common import STAGE_VERSIONS, ModelSpec
from opd_tasks.config import EvaluationConfig
from storage.keys import cache_key
from storage.refs import ArtifactRef
from storage.store import ArtifactStore

EXTRACTORS = {"testbed": extract_testbed_answer, "numeric": extract_numeric_answer}


def evaluate_key(model: ModelSpec, prompts: ArtifactRef, cfg: EvaluationConfig, seed: int, checker: str) -> str:
    return cache_key("evaluate", STAGE_VERSIONS["evaluate"], {"model": model.sha256, "prompts": prompts},
                     cfg.model_dump(mode="json") | {"checker": checker}, seed)


def evaluate(
    store: ArtifactStore,
    model: ModelSpec,
    prompts: ArtifactRef,
    cfg: EvaluationConfig,
    seed: int,
    checker: str = "testbed",
    device: str = "auto",
    progress: bool = True,
) -> ArtifactRef:
    key = evaluate_key(model, prompts, cfg, seed, checker)
    if (ref := store.lookup("evaluate", key)) is not None:
        return ref
    from opd_tasks.hf import generate, load_causal_lm, load_tokenizer, resolve_device

    ptab = store.read_table(prompts, "prompts")
    toks = ptab.column("prompt_token_ids").to_pylist()
    refs = ptab.column("answer").to_pylist()
    pids = ptab.column("prompt_id").to_pylist()
    tok = load_tokenizer(model.path, model.trust_remote_code)
    lm = load_causal_lm(model.path, resolve_device(device), model.dtype, model.trust_remote_code)
    sampled = cfg.pass_k > 1 or not cfg.greedy
    gens = generate(lm, toks, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    n=cfg.pass_k if sampled else 1, temperature=1.0 if sampled else 0.0,
                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed,
                    want_logprobs=False, desc="evaluate", progress=progress)
    check, extract = CHECKERS[checker], EXTRACTORS[checker]
    texts = [tok.decode(g.token_ids, skip_special_tokens=True) for g in gens]
    table = pa.table(
        {
            "prompt_id": [pids[g.prompt_index] for g in gens],
            "sample_id": pa.array([g.sample_id for g in gens], pa.int32()),
            "text": texts,
            "answer": [extract(t) for t in texts],
            "reference": [refs[g.prompt_index] for g in gens],
            "correct": [bool(refs[g.prompt_index] is not None and check(t, refs[g.prompt_index]))
                        for g, t in zip(gens, texts, strict=True)],
            "num_tokens": pa.array([len(g.token_ids) for g in gens], pa.int32()),
        }
    )
    acc = sum(table.column("correct").to_pylist()) / max(1, table.num_rows)
    return store.put_table("evaluate", key, "evals", table, meta={"accuracy": acc, "n": table.num_rows})


def accuracy(store: ArtifactStore, evals: ArtifactRef) -> float:
    """Greedy accuracy (or pass@k: a prompt counts if any of its samples is correct)."""
    t = store.read_table(evals, "evals", columns=["prompt_id", "correct"])
    per: dict[str, bool] = {}
    for pid, ok in zip(t.column("prompt_id").to_pylist(), t.column("correct").to_pylist(), strict=True):
        per[pid] = per.get(pid, False) or ok
    return sum(per.values()) / max(1, len(per))
