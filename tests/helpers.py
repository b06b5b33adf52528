"""Small builders of valid tables for tests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def tokens_table(n_rows: int, n_seq: int = 4, top_k: int = 4, seed: int = 0) -> pa.Table:
    """A valid `tokens` table with `n_rows` rows spread over `n_seq` sequences."""
    rng = np.random.default_rng(seed)
    seq = np.arange(n_rows) % n_seq
    pos = np.arange(n_rows) // n_seq
    slp = -rng.random(n_rows, dtype=np.float32)
    tlp = -rng.random(n_rows, dtype=np.float32)
    regimes = np.array(["normal", "surface", "divergent"])[rng.integers(0, 3, n_rows)]
    return pa.table(
        {
            "prompt_id": pa.array([f"p{s}" for s in seq]),
            "sample_id": pa.array(seq, pa.int32()),
            "pos": pa.array(pos, pa.int32()),
            "token_id": pa.array(rng.integers(0, 100, n_rows), pa.int32()),
            "student_logprob": slp,
            "teacher_logprob": tlp,
            "k1": slp - tlp,
            "rkl_topk": pa.array(np.abs(slp - tlp)),
            "student_entropy": pa.array(rng.random(n_rows, dtype=np.float32)),
            "teacher_entropy": pa.array(rng.random(n_rows, dtype=np.float32)),
            "teacher_rank": pa.array(rng.integers(0, top_k, n_rows), pa.int32()),
            "high_loss": pa.array(rng.random(n_rows) < 0.2),
            "near_future_div": pa.array(rng.random(n_rows, dtype=np.float32)),
            "regime": pa.array(regimes),
            "weight": pa.array(np.ones(n_rows, dtype=np.float32)),
            "role": pa.array(np.array(["form", "reasoning"])[rng.integers(0, 2, n_rows)]),
        }
    )


def updates_table(n: int = 3, loss0: float = 1.0) -> pa.Table:
    return pa.table(
        {
            "step": pa.array(range(n), pa.int32()),
            "loss": pa.array([loss0 / (i + 1) for i in range(n)], pa.float32()),
            "distill_loss": pa.array([loss0 / (i + 1) for i in range(n)], pa.float32()),
            "bridge_loss": pa.array([None] * n, pa.float32()),
            "kl": pa.array([0.1] * n, pa.float32()),
            "grad_norm": pa.array([1.0] * n, pa.float32()),
            "lr": pa.array([1e-3] * n, pa.float32()),
            "tokens_trained": pa.array([100] * n, pa.int64()),
            "weighted_tokens": pa.array([100.0] * n, pa.float32()),
        }
    )


def tiny_model_dir(out, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A randomly initialised tiny Llama + the testbed tokenizer, saved like any real model dir.

    Returns (path, ModelSpec). Random weights are enough for numerical equivalences.
    """
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd_tasks.models import ModelSpec
    from opd_tasks.testbed.tokenizer import save_tokenizer
    from storage.hashing import sha256_tree

    out = Path(out)
    tok = save_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    return out, ModelSpec(path=str(out), sha256=sha256_tree(out))


def scored_env(base, prompts: int, samples: int, max_new_tokens: int, top_k: int, score_batch: int = 64,
               teacher_context=None) -> dict:
    """Tiny random student and teacher, `prompts` testbed prompts, the student's rollouts and the teacher's scores,
    made by the stages themselves in a store under `base` (the teacher with `teacher_context`, a
    TeacherContextConfig, when given). Returns the pieces by name."""
    from pathlib import Path

    from opd_tasks.config import DataConfig, RolloutConfig, ScoringConfig
    from opd_tasks.stages import PROMPTS, ROLLOUT, SCORE, PromptsInputs, RolloutInputs, ScoreInputs
    from storage.store import ArtifactStore

    base = Path(base)
    _, student = tiny_model_dir(base / "student", seed=0, hidden=32)
    _, teacher = tiny_model_dir(base / "teacher", seed=1, hidden=48)
    store = ArtifactStore(base / "root")
    context = {"teacher_context": teacher_context} if teacher_context is not None else {}
    prompt_ref = PROMPTS(store, PromptsInputs(data=DataConfig(), tokenizer=student, split="train", n=prompts,
                                              offset=0, max_context=None, seed=0, **context))
    roll_cfg = RolloutConfig(samples_per_prompt=samples, max_new_tokens=max_new_tokens)
    roll = ROLLOUT(store, RolloutInputs(student=student, prompts=prompt_ref, rollout=roll_cfg, checker="testbed",
                                        seed=0), progress=False)
    scores = SCORE(store, ScoreInputs(teacher=teacher, student=student, rollouts=roll,
                                      scoring=ScoringConfig(top_k=top_k, batch_size=score_batch)), progress=False)
    return {"base": base, "store": store, "student": student, "teacher": teacher, "prompts": prompt_ref,
            "roll": roll, "scores": scores, "roll_cfg": roll_cfg}


def assert_no_pickle_persisted(root) -> None:
    """Security default: nothing Prefect persisted is a pickle: the cache records under `root` and what this
    process's Prefect home holds (a failed flow's exception is persisted there); every file is JSON."""
    import json
    import os
    from pathlib import Path

    places = [Path(root) / "prefect" / "results", Path(os.environ["PREFECT_HOME"]) / "storage"]
    files = [f for d in places if d.is_dir() for f in d.rglob("*") if f.is_file()]
    assert files, f"nothing persisted under {places}"
    for f in files:
        data = f.read_bytes()
        assert not data.startswith((b"\x80", b"gAS", b"gAW")), f"{f} holds a pickle"
        json.loads(data)


def copy_artifact(src, ref, dest) -> None:
    """Copy artifact `ref` from store `src` into store `dest` with its sealed record (what a root copied whole
    carries), so that `dest` adopts it as a cache hit (storage/store.py: an artifact without one is never adopted)."""
    import shutil

    shutil.copytree(src.path_of(ref), dest.layout.artifact_dir(ref.stage, ref.key))
    record = dest.layout.published_record(ref.stage, ref.key)
    record.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src.layout.published_record(ref.stage, ref.key), record)
