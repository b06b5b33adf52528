"""Stage 4, `update`: train the student on its own rollouts with the OPD loss; publish a checkpoint.

The checkpoint artifact holds the student (`model/`), its optimizer and RNG state (`state/`; the format is in
opd_tasks/training/checkpoint.py) and the `updates` table, one row per optimizer step. Nothing in it depends on
wall time (stage seconds live in the run lineage), so the same inputs give the same bytes: a recovered run is
byte-identical to one that never failed.

Old log-probs (the PPO ratio's denominator and the k1 of the advantage): before the first step the trainer
recomputes every sampled token's log-prob with its own model and dtype (float32 weights, the bf16 autocast of
training on CUDA, eval mode), as TRL and verl do, so that the sampler's kernels and dtype (vLLM, bf16 generate)
never enter the ratio. `update.old_logprobs: sampler` uses the sampler's log-probs instead: an explicit
importance-sampling correction for that mismatch. The artifact's `old_logprobs` table records both per token
(`meta.logprob_drift` is their mean |difference|, the gates' drift figure over every trained token).

Per-token weights come from the analysis's `tokens` table when there is an analysis, else 1; with the method's
bridge, the teacher's continuations at divergent positions come from its `probes` table. The loss of an
optimizer step is the token-mean over all completion tokens in that step (micro-batches and gradient
accumulation do not change it). A NaN/inf loss or gradient raises `TrainingError` before the optimizer step and
nothing is published, so the previous checkpoint stays the latest.

No signal, no update (`update.min_signal`, `no_signal`): when the batch's mean |k1| (and, with an analysis, its
mean top-k reverse KL) is below it, no step is taken: the checkpoint is the student's files copied byte for byte
with its optimizer state, and its meta's `skipped` says why (`carry_forward`).

`update.world_size` > 1 trains in that many torchrun ranks (FSDP2), children of this stage, through the same loop
(opd_tasks/training/loop.py, distributed.py); the artifact has the same format, and this process writes its
tables and meta and commits it.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import torch

from opd_tasks.errors import ArtifactError, ConfigError
from opd_tasks.stages.inputs import UpdateInputs
from opd_tasks.stages.registry import Output, StageContext, files_dir
from storage.hashing import sha256_json


def update(ctx: StageContext, x: UpdateInputs) -> Output:
    """One distillation update of the student: a checkpoint (written into `ctx.files`) and the per-step losses.

    Runs inside a forked RNG seeded from the seed (or restored from the parent checkpoint), so the result, saved
    RNG state included, depends only on the inputs, not on what the process did before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(sha256_json(["update-rng", x.seed])[:15], 16))
        return _train(ctx, x)


def _train(ctx: StageContext, x: UpdateInputs) -> Output:
    from opd_tasks.backends.hf import load_causal_lm, resolve_device
    from opd_tasks.backends.loaded import LOADED
    from opd_tasks.progress import Bar
    from opd_tasks.training.checkpoint import load_training_state, save_checkpoint
    from opd_tasks.training.loop import load_sequences, recompute_old_logprobs, train_steps
    from opd_tasks.training.objective import micro_batch_loss
    from opd_tasks.training.sequences import old_logprobs_table

    cfg, student, teacher, seed = x.update, x.student, x.teacher, x.seed
    if x.advantage is not None and cfg.loss != "pg":
        raise ConfigError(f"the opd_return baseline's discounted return is a policy-gradient advantage: it needs "
                          f"update.loss: pg, not {cfg.loss!r}")
    if (why := no_signal(ctx, x)) is not None:
        return carry_forward(ctx, x, why)
    dev = resolve_device(ctx.device)
    if cfg.world_size > 1:  # torchrun ranks in child processes (opd_tasks/training/distributed.py)
        from opd_tasks.training.distributed import check_world_size, launch

        check_world_size(dev, cfg.world_size)
        if dev.type == "cuda":  # the GPUs are the ranks'
            LOADED.release()
        rows, old, n_seqs = launch(ctx, x, files_dir(ctx))
        return _output(x, rows, old, n_seqs)
    seqs, bridge = load_sequences(ctx.store, x)
    tok = LOADED.tokenizer(student)
    if dev.type == "cuda":  # room for the model this stage trains, its gradients and optimizer state
        LOADED.release()
    model = load_causal_lm(student.path, dev, "float32", student.trust_remote_code)  # its own copy: it is trained
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")
    recompute_old_logprobs(model, seqs, tok.pad_token_id, cfg, autocast)
    model.train()
    t_model = LOADED.model(teacher, dev) if cfg.loss == "full_rkl" else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    trainer = load_training_state(student, opt, cfg)

    per_step = cfg.micro_batch_size * cfg.grad_accumulation
    n_steps = cfg.epochs * ((len(seqs) + per_step - 1) // per_step)
    rows = train_steps(
        lambda batch: micro_batch_loss(model, batch, cfg, bridge, tok.pad_token_id, dev, t_model, x.advantage),
        params, opt, seqs, trainer, cfg, seed, bridge is not None, student.sha256, autocast,
        Bar(n_steps, "update", "steps", ctx.progress))

    model.eval()
    save_checkpoint(files_dir(ctx), model, tok, student.dir, opt, trainer, seed, cfg.optimizer_state)
    return _output(x, rows, old_logprobs_table(seqs), len(seqs))


def teacher_signal(ctx: StageContext, x: UpdateInputs) -> dict[str, float]:
    """The batch's teacher signal, from the tables alone (no model): the mean |k1| over every completion token
    (k1 from the sampler's and the teacher's log-probs; the reverse KL is E_S[k1] <= E_S[|k1|], so a small mean |k1|
    bounds it), and with an analysis, the mean top-k reverse KL of its student pass."""
    import numpy as np

    from opd_tasks.training.sequences import scored_sequences

    seqs = scored_sequences(ctx.store, x.rollouts, x.scores)
    k1 = np.concatenate([np.asarray(s.sampling_logprobs, np.float64) - np.asarray(s.teacher_logprobs, np.float64)
                         for s in seqs]) if seqs else np.zeros(0)
    out = {"mean_abs_k1": float(np.abs(k1).mean()) if k1.size else 0.0, "tokens": int(k1.size)}
    if x.analysis is not None:
        rkl = ctx.store.read_table(x.analysis, "tokens", columns=["rkl_topk"]).column("rkl_topk")
        out["mean_rkl_topk"] = float(pc.mean(rkl).as_py() or 0.0)
    return out


def no_signal(ctx: StageContext, x: UpdateInputs) -> str | None:
    """Why the update is skipped (`update.min_signal`: the batch's teacher signal is below it), or None: an
    optimizer step on noise-sized gradients still moves the weights (Adam normalises the step), so a student that
    already matches its teacher would keep changing."""
    floor = x.update.min_signal
    if floor is None:
        return None
    signal = teacher_signal(ctx, x)
    figures = {k: v for k, v in signal.items() if k != "tokens"}
    if not signal["tokens"] or not all(v < floor for v in figures.values()):  # NaN is not "no signal": it trains
        return None  # and fails there with the NaN named
    names = {"mean_abs_k1": "mean |k1|", "mean_rkl_topk": "mean top-k reverse KL"}
    said = " and ".join(f"{names[k]} {v:.3g}" for k, v in figures.items())
    return (f"no teacher signal: {said} nats over {signal['tokens']} tokens, below update.min_signal {floor:g}; "
            "the checkpoint carries the student forward unchanged")


def carry_forward(ctx: StageContext, x: UpdateInputs, why: str) -> Output:
    """A checkpoint that is the student unchanged: its model files copied byte for byte; its optimizer, counters
    and RNG state the student checkpoint's (a copy), or, for a model that is no checkpoint, a never-stepped state
    (`optimizer: null`); empty `updates` and `old_logprobs` tables; `meta.skipped` says why."""
    import shutil
    from pathlib import Path

    from opd_tasks.models import CHECKPOINT_MODEL_DIR, CHECKPOINT_STATE_DIR
    from opd_tasks.training.checkpoint import OPTIMIZER_FILE, fresh_training_state

    student, out = x.student, files_dir(ctx)
    src = student.dir
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src)
        if any(part.startswith(".") for part in rel.parts):  # as the model's hash (sha256_tree) skips them
            continue
        (out / CHECKPOINT_MODEL_DIR / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out / CHECKPOINT_MODEL_DIR / rel)
    state = out / CHECKPOINT_STATE_DIR
    state.mkdir()
    if student.checkpoint is not None:
        parent = Path(student.path).parent / CHECKPOINT_STATE_DIR
        if not (parent / OPTIMIZER_FILE).is_file():
            raise ArtifactError(f"checkpoint {student.checkpoint.short()}: its optimizer state is gone (opd gc); "
                                "recompute the checkpoints with `opd run --refresh update`")
        for f in sorted(parent.iterdir()):
            shutil.copyfile(f, state / f.name)
    else:
        fresh_training_state(state, torch.get_rng_state(), x.seed)
    empty = {t: pa.table({}) for t in ("updates", "old_logprobs")}
    return Output(empty, {"steps": 0, "sequences": 0, "parent": student.sha256, "mean_loss": None,
                          "old_logprobs": x.update.old_logprobs, "logprob_drift": None, "skipped": why})


def _output(x: UpdateInputs, rows: list[dict], old: pa.Table, n_seqs: int) -> Output:
    """The `updates` and `old_logprobs` tables and the meta of the checkpoint beside them."""
    drift = pc.abs(pc.subtract(old.column("sampling_logprob"), old.column("trainer_logprob")))
    return Output({"updates": pa.Table.from_pylist(rows), "old_logprobs": old},
                  {"steps": len(rows), "sequences": n_seqs, "parent": x.student.sha256,
                   "mean_loss": sum(r["loss"] for r in rows) / len(rows), "old_logprobs": x.update.old_logprobs,
                   "logprob_drift": pc.mean(drift).as_py()})
