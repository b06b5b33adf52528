"""Stage 3, `analyze`: per-token divergence metrics, high-loss tokens, near-future detection, regimes and TOPD token
weights (DESIGN.md section 5; docs/method.md says which choices are the paper's and which ours).

    sequences -> loss signal (k1, or the top-k reverse KL from the student's pass) -> high-loss tokens
    -> detector (opd_tasks/topd/detectors.py): D_t at the examined positions -> regimes (D_t vs delta)
    -> token weights (the method's `TokenWeighting`) -> `tokens` and `probes` tables

Writes one artifact with two tables:
- `tokens`: one row per completion token: k1, top-k reverse KL, entropies, the teacher's rank of the sampled
  token, high_loss, near-future divergence D_t (examined high-loss tokens only), regime, weight, and the testbed's
  ground-truth role (`form` / `reasoning` / `answer` / `unknown`) when the prompts come from the testbed.
- `probes`: one row per probed position: the teacher's and the student's continuations (the teacher's is the
  bridge at divergent positions) and their distance.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from opd_tasks.config import AnalysisConfig
from opd_tasks.errors import DataError
from opd_tasks.method import TokenWeighting
from opd_tasks.models import ModelSpec
from opd_tasks.stages.registry import StageContext, StageInputs, stage
from storage.refs import ArtifactRef

log = logging.getLogger(__name__)


class AnalyzeInputs(StageInputs):
    """`student`'s rollouts and `teacher`'s scores of them; `weighting` and `bridge` come from the method
    (opd_tasks/method.py); `label_roles`: the prompts are the testbed's, whose tokens have ground-truth roles."""

    student: ModelSpec
    teacher: ModelSpec
    rollouts: ArtifactRef
    scores: ArtifactRef
    analysis: AnalysisConfig
    weighting: TokenWeighting
    bridge: bool  # generate the teacher's bridge continuation at each divergent position
    label_roles: bool
    seed: int


@stage("analyze", version=7, inputs=AnalyzeInputs, outputs=("tokens", "probes"))
def analyze(ctx: StageContext, x: AnalyzeInputs) -> ArtifactRef:
    """Per-token losses, high-loss tokens, near-future detection, regimes and token weights."""
    from opd_tasks.progress import Bar
    from opd_tasks.topd.detectors import DETECTORS, AnalysisModels, Candidates, Detection, probe
    from opd_tasks.topd.signals import high_loss_mask, probe_positions
    from opd_tasks.topd.statistics import student_statistics
    from opd_tasks.training.sequences import scored_sequences

    cfg = x.analysis
    seqs = scored_sequences(ctx.store, x.rollouts, x.scores, ("teacher_entropy", "topk_ids", "topk_logprobs"))
    if not seqs:
        raise DataError(f"rollouts {x.rollouts.short()} have no completion tokens to analyze")
    models = AnalysisModels(x.student, x.teacher, ctx.device)
    detector = DETECTORS[cfg.detector]
    roles = None
    if x.label_roles:
        from opd_tasks.testbed.labeler import label_token_ids

        roles = [label_token_ids(models.tokenizer, s.tokens, s.prompt) for s in seqs]
    k1 = [list(np.asarray(s.sampling_logprobs) - np.asarray(s.teacher_logprobs)) for s in seqs]
    bounds = np.cumsum([0] + [len(s.tokens) for s in seqs])

    def candidates(signal: list) -> tuple[np.ndarray, Candidates]:
        """The batch's high-loss tokens (flat, and per sequence) and the positions the detector probes."""
        flat = np.concatenate([np.asarray(v, dtype=np.float64) for v in signal])
        high_flat = high_loss_mask(flat, cfg.high_loss_quantile, cfg.high_loss_threshold)
        high = [high_flat[bounds[i] : bounds[i + 1]] for i in range(len(seqs))]
        budget = cfg.probe_budget if detector.budgeted else "all"
        rows = probe_positions(signal, high, budget, detector.skip_last) if detector.probes else []
        return high_flat, Candidates(seqs, signal, high, rows, roles)

    if cfg.detector == "probe" and cfg.loss_signal == "k1":
        # k1 needs no model, so the probed positions are known before the student's statistics pass, and the
        # student's probes continue from that pass's keys/values (each sequence is encoded once by each model).
        high_flat, cand = candidates(k1)
        parts: list[Detection] = []
        bar = Bar(len(cand.probes), "probes", "probes", ctx.progress)

        def on_chunk(first: int, chunk: list, encoded) -> None:
            rows = [(i, t) for i, t in cand.probes if first <= i < first + len(chunk)]
            parts.append(probe(cand, models, cfg, x.bridge, False, rows=rows, student_encoded=encoded))
            bar.update(len(rows))

        student_entropy, rkl = student_statistics(models.student, seqs, cfg.batch_size, on_chunk)
        bar.close()
        detection = Detection.concat(parts, cfg.distance)
    else:
        student_entropy, rkl = student_statistics(models.student, seqs, cfg.batch_size)
        high_flat, cand = candidates(k1 if cfg.loss_signal == "k1" else rkl)
        detection = detector.run(cand, models, cfg, x.bridge, ctx.progress)
    tokens, meta = _tokens_table(x, cand, high_flat, detection, k1, rkl, student_entropy)
    probe_rows = list(detection.divergence) if detector.probes else []  # a detector may drop candidates (oracle)
    probes = pa.table({
        "prompt_id": pa.array([seqs[i].prompt_id for i, _ in probe_rows], pa.string()),
        "sample_id": pa.array([seqs[i].sample_id for i, _ in probe_rows], pa.int32()),
        "pos": pa.array([t for _, t in probe_rows], pa.int32()),
        "teacher_continuation": pa.array(detection.teacher_continuations, pa.list_(pa.int32())),
        "student_continuation": pa.array(detection.student_continuations, pa.list_(pa.int32())),
        "distance": pa.array(detection.distances, pa.float32()),
        "distance_kind": pa.array([detection.distance_kind] * len(probe_rows), pa.string()),
    })
    with ctx.writer() as w:
        w.write_table("tokens", tokens)
        if probes.num_rows:
            w.write_table("probes", probes)
        else:
            w.declare_table("probes")
        w.meta.update(meta)
        return w.commit()


def _tokens_table(x: AnalyzeInputs, cand, high_flat: np.ndarray, detection, k1, rkl,
                  student_entropy) -> tuple[pa.Table, dict]:
    """The `tokens` table (regimes from D_t and delta, weights from the regimes) and the manifest's summary."""
    from opd_tasks.topd.signals import REGIMES, classifier_scores, regime_of, resolve_delta, token_weights

    cfg, seqs = x.analysis, cand.sequences
    d: list[list[float | None]] = [[None] * len(s.tokens) for s in seqs]
    for (i, t), v in detection.divergence.items():
        d[i][t] = v
    all_d = [v for row in d for v in row if v is not None]
    delta = detection.threshold if detection.threshold is not None else resolve_delta(cfg, all_d)
    if cfg.detector in ("window", "probe") and cfg.delta_mode == "absolute" and cfg.delta == 0.0:
        log.warning("analysis.delta is 0 (absolute), the swap detector's threshold; the %s detector's D_t has no "
                    "natural zero (%d of %d probed positions come out divergent): set analysis.delta_mode: "
                    "quantile or a calibrated absolute delta (docs/method.md)", cfg.detector,
                    sum(v >= delta for v in all_d), len(all_d))
    regimes = [[regime_of(bool(cand.high[i][t]), (i, t) in detection.divergence, d[i][t], delta)
                for t in range(len(s.tokens))] for i, s in enumerate(seqs)]
    weights = [token_weights(r, x.weighting) for r in regimes]
    roles = cand.roles if cand.roles is not None else [[None] * len(s.tokens) for s in seqs]
    ranks = [[row.index(y) if y in row else len(row) for y, row in zip(s.tokens, s.topk_ids, strict=True)]
             for s in seqs]
    lengths = [len(s.tokens) for s in seqs]

    def cat(rows, dtype=None):
        return [v for r in rows for v in r] if dtype is None else np.concatenate(
            [np.asarray(r, dtype=dtype) for r in rows])

    tokens = pa.table({
        "prompt_id": pa.array(np.repeat(np.array([s.prompt_id for s in seqs], dtype=object), lengths), pa.string()),
        "sample_id": pa.array(np.repeat(np.array([s.sample_id for s in seqs], dtype=np.int32), lengths)),
        "pos": pa.array(np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])),
        "token_id": pa.array(cat([s.tokens for s in seqs], np.int32)),
        "student_logprob": pa.array(cat([s.sampling_logprobs for s in seqs], np.float32)),
        "teacher_logprob": pa.array(cat([s.teacher_logprobs for s in seqs], np.float32)),
        "k1": pa.array(cat(k1, np.float32)),
        "rkl_topk": pa.array(cat(rkl, np.float32)),
        "student_entropy": pa.array(cat(student_entropy, np.float32)),
        "teacher_entropy": pa.array(cat([s.teacher_entropy for s in seqs], np.float32)),
        "teacher_rank": pa.array(cat(ranks, np.int32)),
        "high_loss": pa.array(high_flat),
        "near_future_div": pa.array(cat(d), pa.float32()),
        "regime": pa.array(cat(regimes), pa.string()),
        "weight": pa.array(cat(weights, np.float32)),
        "role": pa.array(cat(roles), pa.string()),
    })
    flat_regimes = cat(regimes)
    n_high = int(high_flat.sum())
    meta = {
        "tokens": int(len(flat_regimes)), "high_loss": n_high, "delta": delta, "detector": cfg.detector,
        "distance": detection.distance_kind,
        "share": {r: (flat_regimes.count(r) / n_high if n_high else 0.0) for r in REGIMES if r != "normal"},
    }
    if x.label_roles:
        meta["classifier"] = classifier_scores(cat(roles), flat_regimes)
    return tokens, meta
