"""The near-future detectors, one function each, one result type (`Detection`).

A detector gets the batch's high-loss candidates (`Candidates`) and returns the near-future divergence D_t at
the positions it examined, plus, per probed position, the teacher's (and the student's) continuation and their
distance. The analysis stage (opd_tasks/stages/analyze.py) turns D_t into regimes with the threshold delta.

- `window`: D_t = mean loss signal over the student's own next W tokens; every high-loss token; no model pass.
- `probe` (the paper's reading): from the prefix s_t, the teacher's greedy K-token continuation against the
  student's side: what it actually wrote from there (`realised`, the faithful form) or its own greedy continuation
  (`greedy`); D_t = `xent` (the two cross log-likelihood gaps, averaged per token) or `ot` (entropic OT between the
  continuations' input token embeddings, or last-layer states with `ot_embedding: hidden`).
- `swap` (ours): the teacher re-reads the student's next W tokens after its own most likely token a_t instead of
  y_t: D_t = mean_j [log pi_T(y_t+j | s_t, y_t, ..) - log pi_T(y_t+j | s_t, a_t, ..)]. D_t > 0: the rollout builds
  on the student's choice (a fork); D_t <= 0: it reads as well after the teacher's token (surface form).
- `oracle` (testbed only, the positive control): the ground-truth role of the token decides, D_t = +1 for
  `reasoning`, `answer`, `fork` and -1 for `form`, `filler`, with its own threshold 0 (`analysis.delta` does not
  apply); an `unknown` token stays unprobed. What TOPD's training changes achieve with a perfect classifier.
Wherever the teacher runs (its continuations, its re-reads, the bridges) it reads its own prompt: its context, if
it has one (config `teacher_context`), then the student's prompt and completion (`Candidates.teacher_full`); the
student reads its prompt and completion (`Candidates.full`).
`probe` and `swap` examine the `analysis.probe_budget` highest-signal positions per rollout, `oracle` every
high-loss token; with a bridge, the teacher's greedy K-token continuation from each divergent prefix is the bridge
the update trains on.

The analysis stage calls a detector once per block of `analysis.batch_size` sequences (so a shard of the stage,
which starts on a block, batches exactly as the whole stage does), with the block's candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from opd_tasks.config import AnalysisConfig
from opd_tasks.errors import ConfigError, DataError
from opd_tasks.models import ModelSpec
from opd_tasks.progress import bar
from opd_tasks.topd.signals import TRUE_REGIME, window_divergence
from opd_tasks.training.sequences import ScoredSequence


@dataclass
class Candidates:
    """What a detector looks at: one block's sequences (indices 0..), their per-token loss signal and high-loss
    mask, and the (sequence, position) pairs to probe (empty for `window`, which examines every high-loss
    token)."""

    sequences: list[ScoredSequence]
    signal: list[list[float]]
    high: list[np.ndarray]
    probes: list[tuple[int, int]]
    roles: list[list[str]] | None = None  # the testbed's ground-truth role of every token, where known

    @cached_property
    def full(self) -> list[list[int]]:
        """prompt + completion token ids of each sequence."""
        return [list(s.prompt) + list(s.tokens) for s in self.sequences]

    def prefixes(self, rows: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(sequence, prefix length) of each probed (sequence, completion position): the prefix s_t ends before t."""
        return [(i, len(self.sequences[i].prompt) + t) for i, t in rows]

    @cached_property
    def teacher_full(self) -> list[list[int]]:
        """What the teacher reads of each sequence: its prompt (its context + the student's prompt, or the student's
        prompt without a context) + the completion."""
        return [list(s.teacher_input) + list(s.tokens) for s in self.sequences]

    def teacher_prefixes(self, rows: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """`prefixes` in `teacher_full`: the same completion positions after the teacher's prompt."""
        return [(i, len(self.sequences[i].teacher_input) + t) for i, t in rows]


@dataclass
class Detection:
    """D_t at every examined position, and per probed position (Candidates.probes order) the continuations and the
    distance."""

    divergence: dict[tuple[int, int], float]
    teacher_continuations: list[list[int]] = field(default_factory=list)
    student_continuations: list[list[int]] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)


class AnalysisModels:
    """The student, the teacher and the tokenizer, each loaded when a detector first needs it."""

    def __init__(self, student: ModelSpec, teacher: ModelSpec, device: str):
        from opd_tasks.backends.hf import resolve_device

        self.student_spec, self.teacher_spec, self.device = student, teacher, resolve_device(device)

    @cached_property
    def tokenizer(self):
        from opd_tasks.backends.loaded import LOADED

        return LOADED.tokenizer(self.student_spec)

    @cached_property
    def stop_ids(self) -> list[int]:
        """The ids that end a continuation (`hf.stop_token_ids` of the student)."""
        from opd_tasks.backends.hf import stop_token_ids

        return stop_token_ids(self.tokenizer, self.student_spec.path)

    @cached_property
    def student(self):
        from opd_tasks.backends.loaded import LOADED

        return LOADED.model(self.student_spec, self.device)

    @cached_property
    def teacher(self):
        from opd_tasks.backends.loaded import LOADED

        return LOADED.model(self.teacher_spec, self.device)


# ----------------------------------------------------------------------------------------- window


def window(c: Candidates, models: AnalysisModels, cfg: AnalysisConfig, bridge: bool, progress: bool,
           student_encoded=None) -> Detection:
    """D_t = the mean signal over the student's next W tokens, at every high-loss token (no probes, no bridge)."""
    d: dict[tuple[int, int], float] = {}
    for i, mask in enumerate(c.high):
        wd = window_divergence(c.signal[i], cfg.window)
        for t in np.flatnonzero(mask):
            d[(i, int(t))] = wd[t]
    return Detection(d)


# ----------------------------------------------------------------------------------------- probe


def probe(c: Candidates, models: AnalysisModels, cfg: AnalysisConfig, bridge: bool, progress: bool,
          student_encoded=None) -> Detection:
    """From each probed prefix s_t (before the flagged token y_t): the teacher's greedy K-token continuation c_T
    (the bridge) against the student's side c_S, and their distance (`analysis.distance`). The student's side is
    `analysis.probe_student`: `realised`, what it actually wrote, y_t..y_{t+K-1} (no generation; the faithful
    form), or `greedy`, its own greedy continuation from s_t (which hides a sampled wrong token: its greedy choice
    there is usually right). `student_encoded`: the student's forward over the candidates' sequences has already
    run (the analysis's statistics pass), so its side continues from it."""
    rows = c.probes
    if not rows:
        return Detection({})
    if cfg.probe_student == "realised":
        c_t, c_s, gaps = _realised_probes(c, models, cfg, rows, student_encoded, progress)
    else:
        c_t, c_s, gaps = _greedy_probes(c, models, cfg, rows, student_encoded, progress)
    if cfg.distance == "xent":
        # 0.5 * (mean_j [log T(c_T) - log S(c_T)] + mean_j [log S(c_S) - log T(c_S)]), every term teacher-forced
        # (or generated) after the same cached prefix
        dist = [0.5 * (float(np.mean(np.asarray(a) - np.asarray(b))) + float(np.mean(np.asarray(x) - np.asarray(y))))
                for a, b, x, y in zip(*gaps, strict=True)]
    elif cfg.ot_embedding == "input":
        dist = [input_embedding_ot(models.student, a, b) for a, b in zip(c_t, c_s, strict=True)]
    else:
        dist = _ot_distances(models.student, c.full, c.prefixes(rows), c_t, c_s, models.tokenizer.pad_token_id,
                             cfg.batch_size)
    return Detection(dict(zip(rows, dist, strict=True)), c_t, c_s, dist)


def input_embedding_ot(model, a: list[int], b: list[int]) -> float:
    """Entropic OT (cosine cost, uniform weights) between two token sequences' input embeddings in `model`: close
    for paraphrases (the style variants' embeddings are similar), far for other digits or another structure."""
    from opd_tasks.topd.ot import ot_distance

    table = model.get_input_embeddings().weight.detach()
    return ot_distance(table[torch.tensor(a, device=table.device)].float().cpu(),
                       table[torch.tensor(b, device=table.device)].float().cpu())


def _greedy_probes(c: Candidates, models: AnalysisModels, cfg: AnalysisConfig, rows, student_encoded, progress):
    """Both models' greedy continuations from each prefix, and (xent) their log-probs of their own and of the other's
    continuation: (c_T, c_S, (T on c_T, S on c_T, S on c_S, T on c_S))."""
    from opd_tasks.topd.probes import probe_pair

    tok = models.tokenizer
    r = probe_pair(models.teacher, models.student, c.full, c.prefixes(rows), cfg.probe_tokens,
                   eos_token_id=models.stop_ids, pad_token_id=tok.pad_token_id, batch_size=cfg.batch_size,
                   cross=cfg.distance == "xent", progress=progress, student_encoded=student_encoded,
                   teacher_view=(c.teacher_full, c.teacher_prefixes(rows)))
    return r["c_t"], r["c_s"], (r["t_on_t"], r["s_on_t"], r["s_on_s"], r["t_on_s"])


@torch.no_grad()
def _realised_probes(c: Candidates, models: AnalysisModels, cfg: AnalysisConfig, rows, student_encoded, progress):
    """The teacher's greedy continuation c_T from each prefix and the student's realised c_S = y_t..y_{t+K-1}, and
    (xent) both models' teacher-forced log-probs of both after the same cached prefix: (c_T, c_S, (T on c_T, S on
    c_T, S on c_S, T on c_S)). The student encodes nothing new for c_S: it was sampled."""
    from opd_tasks.backends.prefix_cache import PrefixCache

    tok, k = models.tokenizer, cfg.probe_tokens
    prefixes, teacher_prefixes = c.prefixes(rows), c.teacher_prefixes(rows)
    c_s = [list(c.sequences[i].tokens[t : t + k]) for i, t in rows]
    c_t: list[list[int]] = []
    gaps: tuple[list, list, list, list] = ([], [], [], [])
    batch = max(1, len(rows)) if student_encoded is not None else cfg.batch_size
    for s0 in bar(range(0, len(rows), batch), "probes", "batches", progress):
        chunk, given = prefixes[s0 : s0 + batch], c_s[s0 : s0 + batch]
        teacher = PrefixCache(models.teacher, c.teacher_full, teacher_prefixes[s0 : s0 + batch], tok.pad_token_id)
        greedy, t_on_t = teacher.greedy(k, models.stop_ids)
        c_t += greedy
        if cfg.distance == "xent":
            student = PrefixCache(models.student, c.full, chunk, tok.pad_token_id, student_encoded)
            for out, part in zip(gaps, (t_on_t, student.score(greedy), student.score(given), teacher.score(given)),
                                 strict=True):
                out += part
    return c_t, c_s, gaps


def _ot_distances(student_lm, full: list[list[int]], prefixes: list[tuple[int, int]], c_t: list[list[int]],
                  c_s: list[list[int]], pad: int, batch: int) -> list[float]:
    """Entropic OT between the student's last-layer states at the two continuations' tokens, per probe
    (`ot_embedding: hidden`)."""
    from opd_tasks.backends.hf import pack_right
    from opd_tasks.topd.ot import ot_distance

    dev = next(student_lm.parameters()).device
    starts = [full[i][:n] for i, n in prefixes]

    def embed(conts):
        out = []
        for s0 in range(0, len(starts), batch):
            ids, attn, pred, cm = pack_right(starts[s0 : s0 + batch], conts[s0 : s0 + batch], pad)
            h = student_lm(input_ids=ids.to(dev), attention_mask=attn.to(dev),
                           output_hidden_states=True).hidden_states[-1]
            for i in range(ids.shape[0]):
                n = int(cm[i].sum())
                out.append(h[i, (pred[i, :n] + 1).to(dev)].float().cpu())  # states at the continuation tokens
        return out

    with torch.no_grad():
        e_t, e_s = embed(c_t), embed(c_s)
    return [ot_distance(a, b) for a, b in zip(e_t, e_s, strict=True)]


# ----------------------------------------------------------------------------------------- swap


def swap(c: Candidates, models: AnalysisModels, cfg: AnalysisConfig, bridge: bool, progress: bool,
         student_encoded=None) -> Detection:
    """The `swap` detector (module docstring). Both terms of D_t come from one teacher-forced pass over y_t + the
    student's next W tokens and a_t + the same tokens, from the teacher's cached prefix s_t, so the scoring
    backend's numerics never enter D_t. a_t is the teacher's most likely token other than y_t (the scoring
    stage's top-k). With `bridge` and an absolute delta, the teacher's greedy continuations from the divergent
    prefixes (D_t >= delta). A quantile delta is known only once every block's D_t is: those bridges are the
    analysis stage's merge's (`teacher_bridges`)."""
    from opd_tasks.backends.prefix_cache import PrefixCache

    rows, seqs = c.probes, c.sequences
    if not rows:
        return Detection({})
    if min(len(s.topk_ids[0]) for s in seqs) < 2:
        raise ConfigError("analysis.detector 'swap' needs the teacher's top-2 at least (scoring.top_k >= 2)")
    tok, lm, batch = models.tokenizer, models.teacher, cfg.batch_size
    absolute = cfg.delta if cfg.delta_mode == "absolute" else None
    dists: list[float] = []
    conts: list[list[int]] = [[] for _ in rows]
    for s0 in bar(range(0, len(rows), batch), "swap", "batches", progress):
        chunk = rows[s0 : s0 + batch]
        if any(t + 1 >= len(seqs[i].tokens) for i, t in chunk):
            raise DataError("swap: a probed position has no following token")
        prefixes = c.teacher_prefixes(chunk)
        pre = PrefixCache(lm, c.teacher_full, prefixes + prefixes, tok.pad_token_id)  # rows j, P + j: prefix j
        own, alt = [], []
        for i, t in chunk:
            future = seqs[i].tokens[t + 1 : t + 1 + cfg.window]
            own.append([seqs[i].tokens[t]] + future)
            alt.append([next(a for a in seqs[i].topk_ids[t] if a != seqs[i].tokens[t])] + future)
        lp = pre.score(own + alt)
        n = len(chunk)
        for j in range(n):
            # rounded as stored (float32), so the bridge here and the regime the stage sets agree at delta
            dists.append(float(np.float32(np.mean(np.asarray(lp[j][1:], dtype=np.float64)
                                                  - np.asarray(lp[n + j][1:], dtype=np.float64)))))
        if bridge and absolute is not None:
            divergent = [j for j in range(n) if dists[s0 + j] >= absolute]
            for j, cont in zip(divergent, pre.greedy(cfg.probe_tokens, models.stop_ids, only=divergent)[0],
                               strict=True):
                conts[s0 + j] = cont
    return Detection(dict(zip(rows, dists, strict=True)), conts, [[] for _ in dists], dists)


def bridges(models: AnalysisModels, full: list[list[int]], prefixes: list[tuple[int, int]],
            cfg: AnalysisConfig) -> list[list[int]]:
    """The teacher's greedy K-token continuations from the prefixes (sequence index into `full`, prefix length;
    `full` as the teacher reads it: `Candidates.teacher_full`), in batches of `analysis.batch_size`."""
    from opd_tasks.topd.probes import probe_greedy

    if not prefixes:
        return []
    return probe_greedy(models.teacher, full, prefixes, cfg.probe_tokens, eos_token_id=models.stop_ids,
                        pad_token_id=models.tokenizer.pad_token_id, batch_size=cfg.batch_size)[0]


# ----------------------------------------------------------------------------------------- oracle

def oracle(c: Candidates, models: AnalysisModels, cfg: AnalysisConfig, bridge: bool, progress: bool,
           student_encoded=None) -> Detection:
    """D_t = +1 where the token's ground-truth role is a real fork, -1 where it is surface form (threshold 0); the
    teacher's bridge continuation at each divergent position when there is a bridge."""
    if c.roles is None:
        raise ConfigError("analysis.detector 'oracle' reads the testbed's ground-truth token roles: it needs "
                          "data.source: testbed")
    sign = {role: 1.0 if regime == "divergent" else -1.0 for role, regime in TRUE_REGIME.items()}
    rows = [(i, t) for i, t in c.probes if c.roles[i][t] in sign]
    dists = [sign[c.roles[i][t]] for i, t in rows]
    conts: list[list[int]] = [[] for _ in rows]
    if bridge:
        divergent = [j for j, x in enumerate(dists) if x > 0]
        for j, cont in zip(divergent, bridges(models, c.teacher_full,
                                              c.teacher_prefixes([rows[j] for j in divergent]), cfg), strict=True):
            conts[j] = cont
    return Detection(dict(zip(rows, dists, strict=True)), conts, [[] for _ in rows], dists)


# ----------------------------------------------------------------------------------------- registry
