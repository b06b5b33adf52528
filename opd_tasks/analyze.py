"""Stage 3, `analyze`: per-token divergence metrics, high-loss tokens, near-future detectors, regimes and
TOPD token weights (DESIGN.md section 5; docs/method.md says which choices are the paper's and which ours).

Writes one artifact with two tables:
- `tokens`: one row per completion token: k1, top-k reverse KL, entropies, the teacher's rank of the sampled
  token, high_loss, near-future divergence D_t (high-loss tokens only), regime, weight, and the testbed's
  ground-truth role (`form` / `reasoning` / `answer` / `unknown`) when the prompts come from the testbed.
- `probes`: one row per probed position: the teacher's and the student's greedy continuations of the prefix
  s_t = (x, y_<t) and their distance.

Regimes: `normal` (not high-loss), `surface` (high-loss, D_t < delta), `divergent` (high-loss, D_t >= delta),
`unprobed` (high-loss beyond the per-rollout probe budget: treated as in standard OPD, weight 1).
Weights (method): `opd_suppress`: surface -> lambda_s, else 1. `topd`: the same, plus alpha * gamma^j on the
tokens t..t+H after each divergent t. (`opd` does not run this stage: every weight is 1.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from opd_tasks.common import STAGE_VERSIONS, ModelSpec, scored_rollouts
from opd_tasks.config import AnalysisConfig, UpdateConfig
from opd_tasks.errors import ConfigError, DataError
from storage.keys import cache_key
from storage.refs import ArtifactRef
from storage.store import ArtifactStore

log = logging.getLogger(__name__)

REGIMES = ("normal", "surface", "divergent", "unprobed")


def weight_slice(method: str, upd: UpdateConfig) -> dict:
    """The update settings the analysis artifact depends on: the weights, and whether the bridge needs the
    teacher's continuations (the `swap` detector generates them only then)."""
    return {"method": method, "lambda_s": upd.lambda_s, "alpha": upd.alpha, "gamma": upd.gamma,
            "horizon": upd.horizon, "bridge": method == "topd" and upd.beta > 0}


def analyze_key(student: ModelSpec, teacher: ModelSpec, rollouts: ArtifactRef, scores: ArtifactRef,
                cfg: AnalysisConfig, method: str, upd: UpdateConfig, seed: int) -> str:
    return cache_key("analyze", STAGE_VERSIONS["analyze"],
                     {"student": student.sha256, "teacher": teacher.sha256, "rollouts": rollouts, "scores": scores},
                     {"analysis": cfg.model_dump(mode="json"), "weights": weight_slice(method, upd)}, seed)


# ------------------------------------------------------------------------------------ pure pieces


def high_loss_mask(signal: np.ndarray, quantile: float, threshold: float | None) -> np.ndarray:
    """Top-q fraction of the batch's tokens by `signal` (ties included), or signal >= threshold."""
    if signal.size == 0:
        return np.zeros(0, dtype=bool)
    if threshold is not None:
        return signal >= threshold
    cut = np.quantile(signal, 1.0 - quantile, method="higher")
    return signal >= cut


def window_divergence(signal: list[float], window: int) -> list[float]:
    """D_t = mean of the signal over the student's own next `window` tokens t+1..t+W (0 when none follow)."""
    s = np.asarray(signal, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(s)])
    n = len(s)
    out = np.zeros(n)
    for t in range(n):  # n is one sequence's length; the cumsum makes each value O(1)
        a, b = t + 1, min(n, t + 1 + window)
        out[t] = (c[b] - c[a]) / (b - a) if b > a else 0.0
    return out.tolist()


def token_weights(regimes: list[str], method: str, lambda_s: float, alpha: float, gamma: float,
                  horizon: int) -> list[float]:
    """Per-token weights of one sequence from its regimes (see the module docstring)."""
    if method == "opd":
        return [1.0] * len(regimes)
    w = [lambda_s if r == "surface" else 1.0 for r in regimes]
    if method == "topd":
        for t, r in enumerate(regimes):
            if r == "divergent":
                for j in range(horizon + 1):
                    if t + j < len(w):
                        w[t + j] += alpha * gamma**j
    return w


def regime_of(high: bool, probed: bool, d: float | None, delta: float) -> str:
    if not high:
        return "normal"
    if not probed or d is None:
        return "unprobed"
    return "divergent" if d >= delta else "surface"


def resolve_delta(cfg: AnalysisConfig, distances: list[float]) -> float:
    if cfg.delta_mode == "absolute":
        return cfg.delta
    if not 0.0 <= cfg.delta <= 1.0:
        raise ConfigError(f"analysis.delta must be in [0, 1] when analysis.delta_mode is 'quantile', got {cfg.delta}")
    return float(np.quantile(distances, cfg.delta)) if distances else float("inf")


def classifier_scores(roles: list[str | None], regimes: list[str]) -> dict:
    """Precision/recall of `surface` vs ground-truth `form`, and of `divergent` vs `reasoning`/`answer`,
    over classified high-loss tokens (regime surface or divergent)."""
    pairs = [(r, g) for r, g in zip(roles, regimes, strict=True) if r is not None and g in ("surface", "divergent")]
    out: dict = {"classified": len(pairs)}
    for regime, truth in (("surface", {"form"}), ("divergent", {"reasoning", "answer"})):
        tp = sum(1 for r, g in pairs if g == regime and r in truth)
        pred = sum(1 for _, g in pairs if g == regime)
        actual = sum(1 for r, _ in pairs if r in truth)
        out[f"{regime}_precision"] = tp / pred if pred else None
        out[f"{regime}_recall"] = tp / actual if actual else None
    return out


# ----------------------------------------------------------------------------------------- stage


@dataclass
class _Seq:
    pid: str
    sid: int
    prompt: list[int]
    tokens: list[int]
    logp_s: list[float]
    logp_t: list[float]
    ent_t: list[float]
    topk_ids: list[list[int]]
    topk_lp: list[list[float]]


@torch.no_grad()
def _student_pass(model, seqs: list[_Seq], batch: int, on_chunk=None) -> tuple[list[list[float]], list[list[float]]]:
    """Per token: the student's entropy and the top-k reverse KL on the teacher's support, from one decoder
    forward per chunk of `batch` sequences. `on_chunk(first, chunk, encoded)` is called with each chunk's
    `hf.Encoded` (hidden states and KV cache), so near-future probes can start from it instead of encoding the
    same sequences again."""
    from opd_tasks.hf import _head, encode, pack_right
    from opd_tasks.losses import topk_rkl_per_token

    dev = next(model.parameters()).device
    ents, rkls = [], []
    for s0 in range(0, len(seqs), batch):
        chunk = seqs[s0 : s0 + batch]
        ids, attn, pred, _ = pack_right([s.prompt for s in chunk], [s.tokens for s in chunk], 0)
        enc = encode(model, ids, attn, {s0 + i: i for i in range(len(chunk))}, use_cache=on_chunk is not None)
        idx = pred.to(dev)[:, :, None].expand(-1, -1, enc.hidden.shape[-1])
        logits = _head(model, enc.hidden.gather(1, idx))  # [B, T, V] at the completion tokens only
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1).cpu()
        t = pred.shape[1]
        k = len(chunk[0].topk_ids[0])
        tid = torch.zeros((len(chunk), t, k), dtype=torch.long)
        tlp = torch.zeros((len(chunk), t, k))
        for i, s in enumerate(chunk):
            tid[i, : len(s.tokens)] = torch.tensor(s.topk_ids)
            tlp[i, : len(s.tokens)] = torch.tensor(s.topk_lp)
        rkl = topk_rkl_per_token(logits, tid.to(dev), tlp.to(dev)).cpu()
        del logits, logp
        for i, s in enumerate(chunk):
            ents.append(ent[i, : len(s.tokens)].tolist())
            rkls.append(rkl[i, : len(s.tokens)].tolist())
        if on_chunk is not None:
            on_chunk(s0, chunk, enc)
        del enc
    return ents, rkls


def _probe(student_lm, teacher_lm, sequences: list[list[int]], probes: list[tuple[int, int]], k: int, distance: str,
           eos: int, pad: int, batch: int, progress: bool,
           student_encoded=None) -> tuple[list[list[int]], list[list[int]], list[float]]:
    """Greedy K-token continuations by teacher and student from each probe prefix `sequences[i][:n]`, and their
    distance. Prefixes come from the KV cache of one forward over each full sequence (`hf.probe_pair`); the
    student's can be one that already ran (`student_encoded`)."""
    from opd_tasks.hf import probe_pair

    if not probes:
        return [], [], []
    r = probe_pair(teacher_lm, student_lm, sequences, probes, k, eos_token_id=eos, pad_token_id=pad,
                   batch_size=batch, cross=distance == "xent", progress=progress, student_encoded=student_encoded)
    c_t, c_s = r["c_t"], r["c_s"]
    if distance == "xent":
        # each model's log-probs of its own greedy continuation come with it; the cross terms are teacher forcing
        # of the other model's continuation after the same cached prefix
        dist = [0.5 * (float(np.mean(np.asarray(a) - np.asarray(b))) + float(np.mean(np.asarray(c) - np.asarray(d))))
                for a, b, c, d in zip(r["t_on_t"], r["s_on_t"], r["s_on_s"], r["t_on_s"], strict=True)]
    else:
        from opd_tasks.hf import pack_right
        from opd_tasks.ot import ot_distance

        dev = next(student_lm.parameters()).device
        prefixes = [sequences[i][:n] for i, n in probes]

        def embed(conts):
            out = []
            for s0 in range(0, len(prefixes), batch):
                ids, attn, pred, cm = pack_right(prefixes[s0 : s0 + batch], conts[s0 : s0 + batch], pad)
                h = student_lm(input_ids=ids.to(dev), attention_mask=attn.to(dev),
                               output_hidden_states=True).hidden_states[-1]
                for i in range(ids.shape[0]):
                    n = int(cm[i].sum())
                    out.append(h[i, (pred[i, :n] + 1).to(dev)].float().cpu())  # states at the continuation tokens
            return out

        with torch.no_grad():
            e_t, e_s = embed(c_t), embed(c_s)
        dist = [ot_distance(a, b) for a, b in zip(e_t, e_s, strict=True)]
    return c_t, c_s, dist


def _swap(teacher_lm, seqs: list[_Seq], full: list[list[int]], rows: list[tuple[int, int]], window: int,
          delta: float | None, k: int, eos: int, pad: int, batch: int, bridge: bool,
          progress: bool) -> tuple[list[float], list[list[int]]]:
    """The `swap` detector: for each probed (sequence i, position t), D_t = mean over the student's next W tokens
    of log pi_T(y_t+j | s_t, y_t, ...) - log pi_T(y_t+j | s_t, a_t, ...), where a_t is the teacher's most likely
    token other than y_t (from the scoring stage's top-k). Both terms come from one teacher-forced pass over
    y_t + y_t+1..t+W and a_t + y_t+1..t+W from the teacher's cached prefix s_t, so the scoring backend's
    numerics never enter D_t. D_t > 0: the student's next tokens build on its choice at t (a fork with
    consequences); D_t <= 0: they read as well after the teacher's token (a surface-form choice). Positions
    without a following token are never probed (`select`). With `bridge`, the teacher's greedy K-token
    continuation from each divergent prefix (D_t >= delta; with delta None, i.e. a quantile threshold, the
    caller adds them once all D_t are known)."""
    from opd_tasks.hf import _Prefixes

    dists: list[float] = []
    conts: list[list[int]] = [[] for _ in rows]
    for s0 in tqdm(range(0, len(rows), batch), desc="swap", unit="batch", disable=not progress, leave=False):
        chunk = rows[s0 : s0 + batch]
        if any(t + 1 >= len(seqs[i].tokens) for i, t in chunk):
            raise DataError("swap: a probed position has no following token")
        prefixes = [(i, len(seqs[i].prompt) + t) for i, t in chunk]
        pre = _Prefixes(teacher_lm, full, prefixes + prefixes, pad)  # rows j and P + j share prefix j
        own, alt = [], []
        for i, t in chunk:
            fut = seqs[i].tokens[t + 1 : t + 1 + window]
            own.append([seqs[i].tokens[t]] + fut)
            alt.append([next(c for c in seqs[i].topk_ids[t] if c != seqs[i].tokens[t])] + fut)
        lp = pre.score(own + alt)
        n = len(chunk)
        for j in range(n):
            dists.append(float(np.mean(np.asarray(lp[j][1:], dtype=np.float64)
                                       - np.asarray(lp[n + j][1:], dtype=np.float64))))
        if bridge and delta is not None:
            div = [j for j in range(n) if dists[s0 + j] >= delta]
            for j, c in zip(div, pre.greedy(k, eos, only=div)[0], strict=True):
                conts[s0 + j] = c
    return dists, conts


def _swap_bridges(teacher_lm, full: list[list[int]], seqs: list[_Seq], rows: list[tuple[int, int]],
                  divergent: list[int], k: int, eos: int, pad: int, batch: int) -> dict[int, list[int]]:
    """The teacher's greedy continuations from the divergent prefixes `rows[j]`, j in `divergent`."""
    from opd_tasks.hf import probe_greedy

    probes = [(rows[j][0], len(seqs[rows[j][0]].prompt) + rows[j][1]) for j in divergent]
    if not probes:
        return {}
    conts, _ = probe_greedy(teacher_lm, full, probes, k, eos_token_id=eos, pad_token_id=pad, batch_size=batch)
    return dict(zip(divergent, conts, strict=True))


def analyze(
    store: ArtifactStore,
    student: ModelSpec,
    teacher: ModelSpec,
    rollouts: ArtifactRef,
    scores: ArtifactRef,
    cfg: AnalysisConfig,
    method: str,
    upd: UpdateConfig,
    seed: int,
    label_roles: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> ArtifactRef:
    key = analyze_key(student, teacher, rollouts, scores, cfg, method, upd, seed)
    if (ref := store.lookup("analyze", key)) is not None:
        return ref
    from opd_tasks.hf import load_causal_lm, load_tokenizer, resolve_device

    seqs = [_Seq(pid, sid, p, toks, lps, s["teacher_logprob"], s["teacher_entropy"], s["topk_ids"], s["topk_logprobs"])
            for pid, sid, p, toks, lps, s in scored_rollouts(
                store, rollouts, scores, ["teacher_logprob", "teacher_entropy", "topk_ids", "topk_logprobs"])]
    if not seqs:
        raise DataError(f"rollouts {rollouts.short()} have no completion tokens to analyze")
    dev = resolve_device(device)
    tok = load_tokenizer(student.path, student.trust_remote_code)
    s_lm = load_causal_lm(student.path, dev, student.dtype, student.trust_remote_code)
    k1 = [list(np.asarray(s.logp_s) - np.asarray(s.logp_t)) for s in seqs]
    bounds = np.cumsum([0] + [len(s.tokens) for s in seqs])

    def select(signal: list) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, int]]]:
        """High-loss tokens of the batch, per sequence, and the (sequence, position) pairs to probe."""
        flat = np.concatenate([np.asarray(x, dtype=np.float64) for x in signal])
        high_flat = high_loss_mask(flat, cfg.high_loss_quantile, cfg.high_loss_threshold)
        high = [high_flat[bounds[i] : bounds[i + 1]] for i in range(len(seqs))]
        rows: list[tuple[int, int]] = []
        if cfg.detector in ("probe", "swap"):
            for i in range(len(seqs)):
                cand = np.flatnonzero(high[i]).tolist()
                if cfg.detector == "swap":  # the last token has no near future to re-read: never probed
                    cand = [t for t in cand if t < len(seqs[i].tokens) - 1]
                order = sorted(cand, key=lambda t: -signal[i][t])[: cfg.probe_budget]
                rows += [(i, t) for t in sorted(order)]
        return high_flat, high, rows

    # Near-future divergence of high-loss positions.
    d: list[list[float | None]] = [[None] * len(s.tokens) for s in seqs]
    probed: list[list[bool]] = [[False] * len(s.tokens) for s in seqs]
    c_t: list[list[int]] = []
    c_s: list[list[int]] = []
    dists: list[float] = []
    full = [list(s.prompt) + list(s.tokens) for s in seqs]
    if cfg.detector == "probe" and cfg.loss_signal == "k1":
        # k1 needs no model, so the probed positions are known before the student's statistics pass, and the
        # student's probes start from that pass's keys/values (each sequence is encoded once by each model).
        signal = k1
        high_flat, high, probe_rows = select(signal)
        t_lm = load_causal_lm(teacher.path, dev, teacher.dtype, teacher.trust_remote_code)
        bar = tqdm(total=len(probe_rows), desc="probes", unit="probe", disable=not progress, leave=False)

        def on_chunk(first: int, chunk: list[_Seq], enc) -> None:
            rows = [(i, len(seqs[i].prompt) + t) for i, t in probe_rows if first <= i < first + len(chunk)]
            ct, cs, ds = _probe(s_lm, t_lm, full, rows, cfg.probe_tokens, cfg.distance, tok.eos_token_id,
                                tok.pad_token_id, batch=cfg.batch_size, progress=False, student_encoded=enc)
            c_t.extend(ct)
            c_s.extend(cs)
            dists.extend(ds)
            bar.update(len(rows))

        ent_s, rkl = _student_pass(s_lm, seqs, cfg.batch_size, on_chunk)
        bar.close()
    else:
        ent_s, rkl = _student_pass(s_lm, seqs, cfg.batch_size)
        signal = k1 if cfg.loss_signal == "k1" else rkl
        high_flat, high, probe_rows = select(signal)
        if cfg.detector == "probe":
            t_lm = load_causal_lm(teacher.path, dev, teacher.dtype, teacher.trust_remote_code)
            probes = [(i, len(seqs[i].prompt) + t) for i, t in probe_rows]
            c_t, c_s, dists = _probe(s_lm, t_lm, full, probes, cfg.probe_tokens, cfg.distance, tok.eos_token_id,
                                     tok.pad_token_id, batch=cfg.batch_size, progress=progress)
        elif cfg.detector == "swap" and probe_rows:
            if min(len(s.topk_ids[0]) for s in seqs) < 2:
                raise ConfigError("analysis.detector 'swap' needs the teacher's top-2 at least (scoring.top_k >= 2)")
            bridge = method == "topd" and upd.beta > 0
            absolute = cfg.delta if cfg.delta_mode == "absolute" else None
            t_lm = load_causal_lm(teacher.path, dev, teacher.dtype, teacher.trust_remote_code)
            dists, c_t = _swap(t_lm, seqs, full, probe_rows, cfg.window, absolute, cfg.probe_tokens,
                               tok.eos_token_id, tok.pad_token_id, cfg.batch_size, bridge, progress)
            if bridge and absolute is None:
                cut = resolve_delta(cfg, dists)
                got = _swap_bridges(t_lm, full, seqs, probe_rows, [j for j, x in enumerate(dists) if x >= cut],
                                    cfg.probe_tokens, tok.eos_token_id, tok.pad_token_id, cfg.batch_size)
                c_t = [got.get(j, []) for j in range(len(dists))]
            c_s = [[] for _ in dists]
    if cfg.detector == "window":
        for i in range(len(seqs)):
            wd = window_divergence(signal[i], cfg.window)
            for t in np.flatnonzero(high[i]):
                d[i][t], probed[i][t] = wd[t], True
    for (i, t), dist in zip(probe_rows, dists, strict=True):
        d[i][t], probed[i][t] = dist, True
    all_d = [x for row in d for x in row if x is not None]
    delta = resolve_delta(cfg, all_d)
    if cfg.detector != "swap" and cfg.delta_mode == "absolute" and cfg.delta == 0.0:
        log.warning("analysis.delta is 0 (absolute), the swap detector's threshold; the %s detector's D_t has no "
                    "natural zero (%d of %d probed positions come out divergent): set analysis.delta_mode: "
                    "quantile or a calibrated absolute delta (docs/method.md)", cfg.detector,
                    sum(x >= delta for x in all_d), len(all_d))

    regimes = [[regime_of(bool(high[i][t]), probed[i][t], d[i][t], delta) for t in range(len(s.tokens))]
               for i, s in enumerate(seqs)]
    weights = [token_weights(r, method, upd.lambda_s, upd.alpha, upd.gamma, upd.horizon) for r in regimes]
    roles: list[list[str | None]]
    if label_roles:
        from opd_tasks.testbed.labeler import label_token_ids

        roles = [label_token_ids(tok, s.tokens) for s in seqs]
    else:
        roles = [[None] * len(s.tokens) for s in seqs]

    ranks = []
    for s in seqs:
        ranks.append([row.index(y) if y in row else len(row) for y, row in zip(s.tokens, s.topk_ids, strict=True)])
    lengths = [len(s.tokens) for s in seqs]

    def cat(rows, dtype=None):
        return [x for r in rows for x in r] if dtype is None else np.concatenate(
            [np.asarray(r, dtype=dtype) for r in rows])

    tokens = pa.table({
        "prompt_id": pa.array(np.repeat(np.array([s.pid for s in seqs], dtype=object), lengths), pa.string()),
        "sample_id": pa.array(np.repeat(np.array([s.sid for s in seqs], dtype=np.int32), lengths)),
        "pos": pa.array(np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])),
        "token_id": pa.array(cat([s.tokens for s in seqs], np.int32)),
        "student_logprob": pa.array(cat([s.logp_s for s in seqs], np.float32)),
        "teacher_logprob": pa.array(cat([s.logp_t for s in seqs], np.float32)),
        "k1": pa.array(cat(k1, np.float32)),
        "rkl_topk": pa.array(cat(rkl, np.float32)),
        "student_entropy": pa.array(cat(ent_s, np.float32)),
        "teacher_entropy": pa.array(cat([s.ent_t for s in seqs], np.float32)),
        "teacher_rank": pa.array(cat(ranks, np.int32)),
        "high_loss": pa.array(high_flat),
        "near_future_div": pa.array(cat(d), pa.float32()),
        "regime": pa.array(cat(regimes), pa.string()),
        "weight": pa.array(cat(weights, np.float32)),
        "role": pa.array(cat(roles), pa.string()),
    })
    kind = "swap" if cfg.detector == "swap" else cfg.distance
    probes = pa.table({
        "prompt_id": pa.array([seqs[i].pid for i, _ in probe_rows], pa.string()),
        "sample_id": pa.array([seqs[i].sid for i, _ in probe_rows], pa.int32()),
        "pos": pa.array([t for _, t in probe_rows], pa.int32()),
        "teacher_continuation": pa.array(c_t, pa.list_(pa.int32())),
        "student_continuation": pa.array(c_s, pa.list_(pa.int32())),
        "distance": pa.array(dists, pa.float32()),
        "distance_kind": pa.array([kind] * len(probe_rows), pa.string()),
    })
    flat_reg = cat(regimes)
    n_high = int(high_flat.sum())
    meta = {
        "tokens": int(len(flat_reg)), "high_loss": n_high, "delta": delta, "method": method,
        "detector": cfg.detector,
        "distance": {"probe": cfg.distance, "swap": "swap"}.get(cfg.detector),
        "share": {r: (flat_reg.count(r) / n_high if n_high else 0.0) for r in REGIMES if r != "normal"},
    }
    if label_roles:
        meta["classifier"] = classifier_scores(cat(roles), flat_reg)
    with store.writer("analyze", key) as w:
        w.write_table("tokens", tokens)
        if probes.num_rows:
            w.write_table("probes", probes)
        else:
            w.declare_table("probes")
        w.meta.update(meta)
        return w.commit()
