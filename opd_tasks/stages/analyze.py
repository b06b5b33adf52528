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

Row-parallel (opd_tasks/stages/registry.py): a part analyses a run of whole blocks of `analysis.batch_size`
sequences (the rollouts with a completion, in row order), and its detector runs block by block, so a part's rows
are the whole stage's. TOPD's two batch-wide levels are the stage's two hooks:
- `prepare` (`high_loss_cut`), once before the parts: the high-loss cut, `analysis.high_loss_quantile` of every
  sequence's k1 (which needs no model), never below `analysis.min_high_loss`, so a batch without teacher signal
  has no high-loss tokens (the summary's `below_floor` counts what the floor removed). With `loss_signal:
  rkl_topk` the quantile needs the student's pass over every sequence, so the stage runs as one part (unless
  `high_loss_threshold` fixes the cut);
- `finish`, once after them: delta (a quantile of every D_t with `delta_mode: quantile`), every token's regime
  and weight, and the bridges at the divergent positions of a detector whose continuations are not bridges
  (`swap`, with a quantile delta: `teacher_bridges`).
Regimes compare the D_t as stored (float32) with delta, so anyone can recompute them from the table.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opd_tasks.config import AnalysisConfig
from opd_tasks.data import teacher_prompts
from opd_tasks.errors import DataError
from opd_tasks.stages.inputs import AnalyzeInputs
from opd_tasks.stages.registry import Output, StageContext
from opd_tasks.topd import DETECTORS, signals

log = logging.getLogger(__name__)


def analysed_rows(ctx: StageContext, x: AnalyzeInputs) -> list[int]:
    """The input rows of the analysis: the rollouts with at least one completion token, in row order."""
    roll = ctx.store.read_table(x.rollouts, "rollouts", columns=["token_ids"])
    return np.flatnonzero(pc.list_value_length(roll.column("token_ids")).to_numpy() > 0).tolist()


def sequences_per_batch(x: AnalyzeInputs) -> int:
    return x.analysis.batch_size


def needs_every_sequence(x: AnalyzeInputs) -> str | None:
    """Why the analysis cannot split (the high-loss cut needs a model pass over every sequence), if it cannot."""
    cfg = x.analysis
    if cfg.loss_signal == "rkl_topk" and cfg.high_loss_threshold is None:
        return ("with analysis.loss_signal 'rkl_topk' the high-loss quantile is over the student's pass on every "
                "sequence; set analysis.high_loss_threshold (or loss_signal: k1) to shard it")
    return None


def high_loss_cut(ctx: StageContext, x: AnalyzeInputs) -> dict | None:
    """`prepare`, once before the parts: the batch's high-loss cut, `{"cut": c}` (a token is high-loss when its
    signal is >= c): `analysis.high_loss_threshold`, or the k1 quantile of every sequence (never below
    `analysis.min_high_loss`), which needs no model. None with `rkl_topk` and a quantile: the cut is then over the
    student's pass, computed in the analysis itself, which runs as one part (`needs_every_sequence`)."""
    cfg = x.analysis
    if cfg.high_loss_threshold is not None:
        return {"cut": cfg.high_loss_threshold}
    if cfg.loss_signal != "k1":
        return None
    return {"cut": signals.high_loss_cut(every_k1(ctx, x), cfg.high_loss_quantile, None, cfg.min_high_loss)}


def analyze(ctx: StageContext, x: AnalyzeInputs, rows: list[int] | None) -> dict[str, pa.Table]:
    """The `tokens` and `probes` rows of the sequences `rows` (None: every analysed one): the loss signals, the
    high-loss tokens (the batch's cut, `ctx.prepared`) and the detector's D_t, block by block of
    `analysis.batch_size` sequences. Regimes and weights are the batch's, set in `finish`."""
    from opd_tasks.progress import Bar
    from opd_tasks.topd.detectors import AnalysisModels, Candidates
    from opd_tasks.topd.statistics import student_statistics
    from opd_tasks.training.sequences import SCORE_COLUMNS, scored_sequences

    cfg = x.analysis
    seqs = scored_sequences(ctx.store, x.rollouts, x.scores, SCORE_COLUMNS, rows=rows)
    if not seqs:
        raise DataError(f"rollouts {x.rollouts.short()} have no completion tokens to analyze")
    models = AnalysisModels(x.student, x.teacher, ctx.device)
    detector = DETECTORS[cfg.detector]
    run_detector = detector.fn()
    roles = None
    if x.label_roles:
        from opd_tasks.testbed.labeler import label_token_ids

        roles = [label_token_ids(models.tokenizer, s.tokens, s.prompt) for s in seqs]
    k1 = [k1_of(s) for s in seqs]
    signal = k1  # the loss signal: k1, or the top-k reverse KL once the student's pass has run
    cut = ctx.prepared["cut"] if ctx.prepared is not None else None
    d: list[list[float | None]] = [[None] * len(s.tokens) for s in seqs]
    probes: list[tuple[int, int, list[int], list[int], float]] = []  # (sequence, position, c_T, c_S, distance)
    high_loss: list[np.ndarray] = []  # each sequence's high-loss mask, block by block
    bar = Bar(len(seqs), "analyze", "sequences", ctx.progress)

    def detect(first: int, block: list, encoded) -> None:
        """Run the detector on the sequences `first`.. of one block (`encoded`: the student's pass over them)."""
        own = signal[first : first + len(block)]
        high = [np.asarray(v, dtype=np.float64) >= cut for v in own]
        high_loss.extend(high)
        budget = cfg.probe_budget if detector.budgeted else "all"
        at = signals.probe_positions(own, high, budget, detector.skip_last) if detector.probes else []
        cand = Candidates(block, own, high, at, None if roles is None else roles[first : first + len(block)])
        found = run_detector(cand, models, cfg, x.bridge, False, student_encoded=encoded)
        for (i, t), v in found.divergence.items():
            d[first + i][t] = v
        if detector.probes:  # a detector may drop candidates (oracle): the probes are what it examined
            probes.extend((first + i, t, a, b, v) for (i, t), a, b, v in zip(
                found.divergence, found.teacher_continuations, found.student_continuations, found.distances,
                strict=True))
        bar.update(len(block))

    if cfg.loss_signal == "k1":  # the high-loss tokens are known before the student's pass: detect as it goes
        entropy, rkl = student_statistics(models.student, seqs, cfg.batch_size, detect, detector.reuses_student_pass)
    else:
        entropy, rkl = student_statistics(models.student, seqs, cfg.batch_size)
        signal = rkl
        if cut is None:  # a quantile of the student's pass: this part holds every sequence (needs_every_sequence)
            cut = signals.high_loss_cut(np.concatenate([np.asarray(v, dtype=np.float64) for v in rkl]),
                                        cfg.high_loss_quantile, None, cfg.min_high_loss)
        for first in range(0, len(seqs), cfg.batch_size):
            detect(first, seqs[first : first + cfg.batch_size], None)
    bar.close()
    tokens = _tokens_table(seqs, np.concatenate(high_loss), d, k1, rkl, entropy, roles)
    probe_table = pa.table({
        "prompt_id": pa.array([seqs[i].prompt_id for i, *_ in probes], pa.string()),
        "sample_id": pa.array([seqs[i].sample_id for i, *_ in probes], pa.int32()),
        "pos": pa.array([t for _, t, *_ in probes], pa.int32()),
        "teacher_continuation": pa.array([p[2] for p in probes], pa.list_(pa.int32())),
        "student_continuation": pa.array([p[3] for p in probes], pa.list_(pa.int32())),
        "distance": pa.array([p[4] for p in probes], pa.float32()),
        "distance_kind": pa.array([detector.distance(cfg)] * len(probes), pa.string()),
    })
    return {"tokens": tokens, "probes": probe_table}


def finish(ctx: StageContext, x: AnalyzeInputs, tables: dict[str, pa.Table]) -> Output:
    """Once after the parts, over the whole batch: delta, every token's regime and weight, the bridges a detector
    makes only once delta is known (`Detector.bridges_after` with a quantile delta), and the summary."""
    cfg, detector = x.analysis, DETECTORS[x.analysis.detector]
    tokens, probes = tables["tokens"], tables["probes"]
    delta = resolved_delta(cfg, tokens)
    tokens = with_regimes(tokens, delta, x)
    if not detector.natural_zero and cfg.delta_mode == "absolute" and cfg.delta == 0.0:
        d = tokens.column("near_future_div").drop_null()
        log.warning("analysis.delta is 0 (absolute), the swap detector's threshold; the %s detector's D_t has no "
                    "natural zero (%d of %d probed positions come out divergent): set analysis.delta_mode: "
                    "quantile or a calibrated absolute delta (docs/method.md)", cfg.detector,
                    int(pc.sum(pc.greater_equal(d, delta)).as_py() or 0), len(d))
    if x.bridge and detector.bridges_after and cfg.delta_mode == "quantile":
        probes = teacher_bridges(ctx, x, probes, delta)
    regimes = tokens.column("regime").to_pylist()
    n_high = int(pc.sum(tokens.column("high_loss")).as_py() or 0)
    meta = {
        "tokens": tokens.num_rows, "high_loss": n_high, "below_floor": below_floor(cfg, tokens, n_high),
        "delta": delta, "detector": cfg.detector, "distance": detector.distance(cfg),
        "share": {r: (regimes.count(r) / n_high if n_high else 0.0) for r in signals.REGIMES if r != "normal"},
    }
    if x.label_roles:
        meta["classifier"] = signals.classifier_scores(tokens.column("role").to_pylist(), regimes)
    return Output({"tokens": tokens, "probes": probes}, meta)


def below_floor(cfg: AnalysisConfig, tokens: pa.Table, n_high: int) -> int:
    """How many tokens the quantile made high-loss that `analysis.min_high_loss` removed (counted on the stored
    float32 signal; 0 with an absolute `high_loss_threshold`, which the floor does not touch)."""
    if cfg.high_loss_threshold is not None or not tokens.num_rows:
        return 0
    signal = tokens.column("k1" if cfg.loss_signal == "k1" else "rkl_topk").to_numpy().astype(np.float64)
    return max(0, int((signal >= signals.high_loss_cut(signal, cfg.high_loss_quantile, None)).sum()) - n_high)


def k1_of(s) -> np.ndarray:
    """k1 = log pi_S(y_t) - log pi_T(y_t) at each token of a scored sequence (float64)."""
    return np.asarray(s.sampling_logprobs, dtype=np.float64) - np.asarray(s.teacher_logprobs, dtype=np.float64)


def every_k1(ctx: StageContext, x: AnalyzeInputs) -> np.ndarray:
    """k1 at every completion token of the batch, in no particular order (what the high-loss quantile needs), from
    the two log-prob columns joined in Arrow: a shard turns no other sequence into Python lists."""
    roll = ctx.store.read_table(x.rollouts, "rollouts", columns=["prompt_id", "sample_id", "logprobs"])
    lps = roll.column("logprobs").combine_chunks()
    offsets = lps.offsets.to_numpy()
    lengths = np.diff(offsets)
    seq = pa.array(np.repeat(np.arange(len(lengths)), lengths))
    sampled = pa.table({"prompt_id": pc.take(roll.column("prompt_id"), seq),
                        "sample_id": pc.take(roll.column("sample_id"), seq),
                        "pos": pa.array(np.arange(offsets[-1] - offsets[0], dtype=np.int64)
                                        - np.repeat(offsets[:-1] - offsets[0], lengths), pa.int32()),
                        "sampling_logprob": lps.flatten()})
    teacher = ctx.store.read_table(x.scores, "teacher_scores",
                                   columns=["prompt_id", "sample_id", "pos", "teacher_logprob"])
    both = sampled.join(teacher, ["prompt_id", "sample_id", "pos"])
    return (both.column("sampling_logprob").to_numpy().astype(np.float64)
            - both.column("teacher_logprob").to_numpy().astype(np.float64))


def resolved_delta(cfg: AnalysisConfig, tokens: pa.Table) -> float:
    """The divergence threshold over these tokens: the detector's own, `analysis.delta`, or (delta_mode quantile)
    that quantile of their stored D_t."""
    own = DETECTORS[cfg.detector].threshold
    if own is not None:
        return own
    d = tokens.column("near_future_div").drop_null().to_numpy().astype(np.float64)
    return signals.resolve_delta(cfg, d.tolist())


def with_regimes(tokens: pa.Table, delta: float, x: AnalyzeInputs) -> pa.Table:
    """`tokens` with each token's regime (high_loss, D_t against delta) and its weight (the method's weighting)."""
    d = tokens.column("near_future_div")
    regime = signals.regimes(tokens.column("high_loss").to_numpy(), pc.is_valid(d).to_numpy(),
                     d.to_numpy(zero_copy_only=False).astype(np.float64), delta)
    weight = signals.token_weights(regime, tokens.column("pos").to_numpy(), x.weighting)
    at = tokens.schema.get_field_index
    tokens = tokens.set_column(at("regime"), "regime", pa.array(regime, pa.string()))
    return tokens.set_column(at("weight"), "weight", pa.array(weight.astype(np.float32)))


def teacher_bridges(ctx: StageContext, x: AnalyzeInputs, probes: pa.Table, delta: float) -> pa.Table:
    """`probes` with the teacher's bridge continuation at every divergent one (distance >= delta): the `swap`
    detector's, whose divergent positions are known only once the batch's quantile delta is."""
    from opd_tasks.topd.detectors import AnalysisModels, bridges

    divergent = np.flatnonzero(probes.column("distance").to_numpy().astype(np.float64) >= delta)
    roll = ctx.store.read_table(x.rollouts, "rollouts", columns=["prompt_id", "sample_id", "prompt_token_ids",
                                                                  "teacher_prompt_token_ids", "token_ids"])
    row = {k: i for i, k in enumerate(zip(roll.column("prompt_id").to_pylist(),
                                          roll.column("sample_id").to_pylist(), strict=True))}
    chosen = probes.take(pa.array(divergent, pa.int64())).select(["prompt_id", "sample_id", "pos"]).to_pylist()
    at = [(row[(p["prompt_id"], p["sample_id"])], p["pos"]) for p in chosen]
    used = sorted({i for i, _ in at})
    prompts = teacher_prompts(roll.take(pa.array(used, pa.int64())))
    full = [p + c for p, c in zip(prompts, roll.column("token_ids").take(used).to_pylist(), strict=True)]
    index = {i: n for n, i in enumerate(used)}
    prefixes = [(index[i], len(prompts[index[i]]) + t) for i, t in at]
    got = bridges(AnalysisModels(x.student, x.teacher, ctx.device), full, prefixes, x.analysis)
    conts = probes.column("teacher_continuation").to_pylist()
    for j, cont in zip(divergent, got, strict=True):
        conts[j] = cont
    return probes.set_column(probes.schema.get_field_index("teacher_continuation"), "teacher_continuation",
                             pa.array(conts, pa.list_(pa.int32())))


def _tokens_table(seqs: list, high: np.ndarray, d: list, k1: list, rkl: list, entropy: list,
                  roles: list | None) -> pa.Table:
    """The `tokens` rows of `seqs` (regime and weight still to be set: `with_regimes`)."""
    ranks = [[row.index(y) if y in row else len(row) for y, row in zip(s.tokens, s.topk_ids, strict=True)]
             for s in seqs]
    lengths = [len(s.tokens) for s in seqs]
    roles = roles if roles is not None else [[None] * n for n in lengths]

    def cat(rows, dtype=None):
        return [v for r in rows for v in r] if dtype is None else np.concatenate(
            [np.asarray(r, dtype=dtype) for r in rows])

    n = sum(lengths)
    return pa.table({
        "prompt_id": pa.array(np.repeat(np.array([s.prompt_id for s in seqs], dtype=object), lengths), pa.string()),
        "sample_id": pa.array(np.repeat(np.array([s.sample_id for s in seqs], dtype=np.int32), lengths)),
        "pos": pa.array(np.concatenate([np.arange(m, dtype=np.int32) for m in lengths])),
        "token_id": pa.array(cat([s.tokens for s in seqs], np.int32)),
        "student_logprob": pa.array(cat([s.sampling_logprobs for s in seqs], np.float32)),
        "teacher_logprob": pa.array(cat([s.teacher_logprobs for s in seqs], np.float32)),
        "k1": pa.array(cat(k1, np.float32)),
        "rkl_topk": pa.array(cat(rkl, np.float32)),
        "student_entropy": pa.array(cat(entropy, np.float32)),
        "teacher_entropy": pa.array(cat([s.teacher_entropy for s in seqs], np.float32)),
        "teacher_rank": pa.array(cat(ranks, np.int32)),
        "high_loss": pa.array(high),
        "near_future_div": pa.array(cat(d), pa.float32()),
        "regime": pa.array(["normal"] * n, pa.string()),
        "weight": pa.array(np.ones(n, dtype=np.float32)),
        "role": pa.array(cat(roles), pa.string()),
    })
