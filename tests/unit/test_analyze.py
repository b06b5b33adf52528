"""Divergence analysis: high-loss selection, detectors, regimes, weights, OT, the stage end to end, the bridge."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from opd_tasks.config import (
    AnalysisConfig,
    RunConfig,
    ScoringConfig,
    TopdConfig,
    UpdateConfig,
)
from opd_tasks.errors import ConfigError
from opd_tasks.method import Bridge, TokenWeighting, plan
from opd_tasks.stages import (
    ANALYZE,
    SCORE,
    UPDATE,
    AnalyzeInputs,
    ScoreInputs,
    UpdateInputs,
)
from opd_tasks.testbed.labeler import ROLES
from opd_tasks.topd.ot import cosine_cost, ot_distance, sinkhorn
from opd_tasks.topd.signals import (
    classifier_scores,
    high_loss_mask,
    regime_of,
    regimes,
    token_weights,
    window_divergence,
)
from opd_tasks.training.sequences import group_tokens
from storage.store import ArtifactStore
from tests.helpers import copy_artifact, scored_env


def test_high_loss_quantile_and_threshold() -> None:
    s = np.array([0.1, 5.0, 0.2, 3.0, 0.3, 0.0, 1.0, 0.5, 0.4, 2.0])
    assert high_loss_mask(s, 0.2, None).tolist() == [x >= 3.0 for x in s]
    assert high_loss_mask(s, 0.3, None).sum() == 3
    assert high_loss_mask(s, 1.0, None).all()
    assert high_loss_mask(s, 0.2, 0.45).tolist() == [x >= 0.45 for x in s]


def test_window_divergence_matches_loop() -> None:
    rng = np.random.default_rng(0)
    sig = rng.normal(size=13).tolist()
    for w in (1, 3, 8, 20):
        got = window_divergence(sig, w)
        for t in range(len(sig)):
            nxt = sig[t + 1 : t + 1 + w]
            assert got[t] == pytest.approx(sum(nxt) / len(nxt) if nxt else 0.0)


def test_spike_is_surface_and_persistent_drift_is_divergent() -> None:
    """Known by construction: a one-token spike that vanishes vs one after which the gap persists."""
    spike = [0.0, 0.1, 6.0, 0.0, 0.1, 0.0, 0.0, 0.1, 0.0, 0.0]
    drift = [0.0, 0.1, 6.0, 3.0, 4.0, 3.5, 5.0, 4.0, 3.0, 4.0]
    for sig, want in ((spike, "surface"), (drift, "divergent")):
        high = high_loss_mask(np.array(sig), 0.1, None)
        assert high.tolist().index(True) == 2 and high.sum() == 1
        d = window_divergence(sig, 4)
        regimes = [regime_of(bool(h), True, d[t], delta=1.0) for t, h in enumerate(high)]
        assert regimes[2] == want and regimes.count("normal") == 9


def _weights_loop(reg: list[str], w: TokenWeighting) -> list[float]:
    """The token weights of one sequence, by the definition (docs/method.md), one token at a time."""
    ref = [w.surface_weight if r == "surface" else 1.0 for r in reg]
    for t, r in enumerate(reg):
        if r == "divergent":
            for j in range(w.spread_horizon + 1):
                if t + j < len(ref):
                    ref[t + j] += w.spread_weight * w.spread_decay**j
    return ref


def test_token_weights_match_loop() -> None:
    reg = ["normal", "surface", "divergent", "normal", "divergent", "surface", "normal", "unprobed"]

    def weights(w: TokenWeighting) -> list[float]:
        return token_weights(np.array(reg), np.arange(len(reg)), w).tolist()

    assert weights(TokenWeighting()) == [1.0] * 8  # the default: every weight 1
    assert weights(TokenWeighting(surface_weight=0.1)) == [1, 0.1, 1, 1, 1, 0.1, 1, 1]
    spread = TokenWeighting(surface_weight=0.0, spread_weight=0.5, spread_decay=0.8, spread_horizon=3)
    got = weights(spread)
    assert got == _weights_loop(reg, spread)  # the same additions in the same order: equal, not just close
    assert got[4] == pytest.approx(1 + 0.5 * 0.8**2 + 0.5)  # overlapping spreads add up
    # many sequences one after the other: a spread never crosses into the next sequence
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 12, size=40)
    many = [rng.choice(["normal", "surface", "divergent", "unprobed"], size=n).tolist() for n in lengths]
    flat = token_weights(np.array([r for s in many for r in s]), np.concatenate([np.arange(n) for n in lengths]),
                         spread)
    assert flat.tolist() == [v for s in many for v in _weights_loop(s, spread)]


def test_vectorised_regimes_match_regime_of() -> None:
    rng = np.random.default_rng(1)
    high, probed = rng.random(200) < 0.5, rng.random(200) < 0.6
    d = np.where(rng.random(200) < 0.1, np.nan, rng.normal(size=200))  # a NaN D_t is probed, not divergent
    got = regimes(high, probed, d, 0.3).tolist()
    assert got == [regime_of(bool(h), bool(p), float(v), 0.3) for h, p, v in zip(high, probed, d, strict=True)]
    assert {"normal", "unprobed", "surface", "divergent"} == set(got)


def test_classifier_scores_known_case() -> None:
    roles = ["form", "form", "reasoning", "reasoning", "answer", "form", None]
    regs = ["surface", "divergent", "divergent", "surface", "divergent", "normal", "surface"]
    s = classifier_scores(roles, regs)
    assert s["classified"] == 5
    assert s["surface_precision"] == 0.5 and s["surface_recall"] == 0.5
    assert s["divergent_precision"] == pytest.approx(2 / 3) and s["divergent_recall"] == pytest.approx(2 / 3)


def test_sinkhorn_matches_exact_assignment() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 5):
        a, b = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
        c = cosine_cost(a, b)
        exact = min(sum(c[i, p[i]].item() for i in range(n)) / n for p in itertools.permutations(range(n)))
        plan, cost = sinkhorn(c, eps=0.002, iters=3000)
        assert cost.item() == pytest.approx(exact, abs=2e-3)
        uniform = torch.full((n,), 1 / n, dtype=torch.float64)
        torch.testing.assert_close(plan.sum(0), uniform, atol=1e-7, rtol=0)  # exact (to rounding) after a g update
        torch.testing.assert_close(plan.sum(1), uniform, atol=1e-3, rtol=0)
    x = torch.randn(4, 8, generator=g)
    assert ot_distance(x, x, eps=0.002, iters=3000) == pytest.approx(0.0, abs=2e-3)
    # Two points each: orthogonal pairs matched crosswise cost 0; straight they would cost 1.
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert ot_distance(torch.stack([e1, e2]), torch.stack([e2, e1]), eps=0.002, iters=3000) == pytest.approx(
        0.0, abs=1e-3)
    assert ot_distance(torch.stack([e1, e1]), torch.stack([e2, e2]), eps=0.01) == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    return scored_env(tmp_path_factory.mktemp("analyze"), prompts=5, samples=2, max_new_tokens=10, top_k=4)


def _score(store, teacher, student, roll, top_k: int):
    return SCORE(store, ScoreInputs(teacher=teacher, student=student, rollouts=roll,
                                    scoring=ScoringConfig(top_k=top_k)), progress=False)


def _analyze(env, cfg: AnalysisConfig, method: str = "topd", topd: TopdConfig | None = None,
             label_roles: bool = False, store: ArtifactStore | None = None, rollouts=None, scores=None):
    """The analysis stage as the loop calls it for `method` (opd_tasks/method.py) with `topd` settings."""
    p = plan(RunConfig(method=method, topd=topd or TopdConfig()))
    return ANALYZE(store or env["store"], AnalyzeInputs(
        student=env["student"], teacher=env["teacher"], rollouts=rollouts or env["roll"],
        scores=scores or env["scores"], analysis=cfg, weighting=p.weighting, bridge=p.bridge is not None,
        label_roles=label_roles, seed=0), progress=False)


def _update(env, upd: UpdateConfig, analysis, method: str = "topd", topd: TopdConfig | None = None):
    p = plan(RunConfig(method=method, topd=topd or TopdConfig()))
    return UPDATE(env["store"], UpdateInputs(student=env["student"], rollouts=env["roll"], scores=env["scores"],
                                             analysis=analysis, teacher=env["teacher"], update=upd, bridge=p.bridge,
                                             seed=0), progress=False)


@pytest.mark.parametrize(("detector", "distance"), [("window", "xent"), ("probe", "xent"), ("probe", "ot"),
                                                   ("swap", "xent")])
def test_analyze_stage_tables_are_consistent(env, detector: str, distance: str) -> None:
    store: ArtifactStore = env["store"]
    cfg = AnalysisConfig(detector=detector, distance=distance, probe_tokens=5, probe_budget=2, delta=0.5,
                         delta_mode="quantile")
    ref = _analyze(env, cfg, label_roles=True)
    tok = store.read_table(ref, "tokens")
    scores = store.read_table(env["scores"])
    assert tok.num_rows == scores.num_rows
    rows = tok.to_pylist()
    sc = {(r["prompt_id"], r["sample_id"], r["pos"]): r for r in scores.to_pylist()}
    for r in rows:
        s = sc[(r["prompt_id"], r["sample_id"], r["pos"])]
        assert r["k1"] == pytest.approx(r["student_logprob"] - s["teacher_logprob"], abs=1e-5)
        assert r["teacher_rank"] == (s["topk_ids"].index(r["token_id"]) if r["token_id"] in s["topk_ids"] else 4)
        assert r["rkl_topk"] >= -1e-6 and r["role"] in ROLES
        assert (r["regime"] == "normal") == (not r["high_loss"])
        assert (r["near_future_div"] is not None) == (r["regime"] in ("surface", "divergent"))
    high = [r for r in rows if r["high_loss"]]
    assert len(high) == pytest.approx(0.2 * len(rows), abs=len(rows) * 0.1 + 1)
    probes = store.read_table(ref, "probes")
    if detector in ("probe", "swap"):
        per_seq: dict = {}
        for p in probes.to_pylist():
            per_seq[(p["prompt_id"], p["sample_id"])] = per_seq.get((p["prompt_id"], p["sample_id"]), 0) + 1
            assert len(p["teacher_continuation"]) <= 5
            assert p["distance_kind"] == (distance if detector == "probe" else "swap")
            if detector == "probe":
                assert len(p["teacher_continuation"]) >= 1
        assert max(per_seq.values()) <= 2
        assert probes.num_rows == sum(r["regime"] in ("surface", "divergent") for r in rows)
    else:
        assert probes.num_rows == 0
    # Weights equal a recomputation from the regimes, sequence by sequence.
    g = group_tokens(tok, ["regime", "weight"])
    for v in g.values():
        assert v["weight"] == pytest.approx(_weights_loop(v["regime"], plan(RunConfig(method="topd")).weighting))
    meta = store.manifest(ref)["meta"]
    assert set(meta["share"]) == {"surface", "divergent", "unprobed"} and "classifier" in meta


@pytest.mark.parametrize("batch_size", [3, 256])
def test_student_statistics_and_chunked_probes_match_independent_computations(env, batch_size: int) -> None:
    """The student statistics pass (decoder, then the head at completion positions only), in chunks of
    `batch_size` sequences whose keys/values the student's probes reuse, against independent computations:
    entropy from `score_sequences` (a full forward with every logit), the top-k reverse KL from a per-token loop
    over plain Python floats, and each probe's continuations and distance from `probe_pair` encoding the
    sequences afresh. With 3 sequences per chunk the probes span several chunks."""
    import math

    from opd_tasks.backends.hf import load_causal_lm, score_sequences
    from opd_tasks.topd.probes import probe_pair

    store: ArtifactStore = env["store"]
    roll = {(r["prompt_id"], r["sample_id"]): r for r in store.read_table(env["roll"]).to_pylist()}
    scores = {(r["prompt_id"], r["sample_id"], r["pos"]): r for r in store.read_table(env["scores"]).to_pylist()}
    s_lm = load_causal_lm(env["student"].path, torch.device("cpu"), "float32")
    t_lm = load_causal_lm(env["teacher"].path, torch.device("cpu"), "float32")
    keys = list(roll)
    ref = score_sequences(s_lm, [roll[k]["prompt_token_ids"] for k in keys], [roll[k]["token_ids"] for k in keys],
                          pad_token_id=0, top_k=1, batch_size=64, progress=False)
    ent = {(*k, j): e for k, sc in zip(keys, ref, strict=True) for j, e in enumerate(sc.entropy)}
    cfg = AnalysisConfig(detector="probe", distance="xent", probe_tokens=4, probe_budget=2, batch_size=batch_size,
                         probe_student="greedy")
    a = _analyze(env, cfg)
    rows = store.read_table(a, "tokens").to_pylist()
    for r in rows:
        key = (r["prompt_id"], r["sample_id"], r["pos"])
        assert r["student_entropy"] == pytest.approx(ent[key], abs=1e-4)
        prefix = roll[key[:2]]["prompt_token_ids"] + roll[key[:2]]["token_ids"][: r["pos"]]
        with torch.no_grad():
            logits = s_lm(input_ids=torch.tensor([prefix])).logits[0, -1].double().tolist()
        sc = scores[key]
        s_sel = [logits[i] for i in sc["topk_ids"]]
        zs = math.log(sum(math.exp(x) for x in s_sel))
        zt = math.log(sum(math.exp(x) for x in sc["topk_logprobs"]))
        want = sum(math.exp(x - zs) * ((x - zs) - (y - zt)) for x, y in zip(s_sel, sc["topk_logprobs"], strict=True))
        assert r["rkl_topk"] == pytest.approx(want, abs=1e-4)
    probes = store.read_table(a, "probes").to_pylist()
    assert probes and (batch_size == 256 or len({(p["prompt_id"], p["sample_id"]) for p in probes}) > batch_size)
    seqs = [roll[k]["prompt_token_ids"] + roll[k]["token_ids"] for k in keys]
    where = {k: i for i, k in enumerate(keys)}
    at = [(where[(p["prompt_id"], p["sample_id"])], len(roll[(p["prompt_id"], p["sample_id"])]["prompt_token_ids"])
           + p["pos"]) for p in probes]
    fresh = probe_pair(t_lm, s_lm, seqs, at, 4, eos_token_id=2, pad_token_id=0, batch_size=5)
    assert [p["teacher_continuation"] for p in probes] == fresh["c_t"]
    assert [p["student_continuation"] for p in probes] == fresh["c_s"]
    for p, a_t, b_t, a_s, b_s in zip(probes, fresh["t_on_t"], fresh["s_on_t"], fresh["s_on_s"], fresh["t_on_s"],
                                     strict=True):
        want = 0.5 * (float(np.mean(np.subtract(a_t, b_t))) + float(np.mean(np.subtract(a_s, b_s))))
        assert p["distance"] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("delta_mode", ["absolute", "quantile"])
def test_swap_detector_matches_a_slow_loop_and_bridges_only_divergent_positions(env, delta_mode: str) -> None:
    """`swap`: each stored D_t equals mean_j[log T(y_t+j | s_t, y_t, ..) - log T(y_t+j | s_t, a_t, ..)] over the
    student's next W tokens, recomputed here with one full forward per token (no cache, no batching), with a_t
    the teacher's most likely token other than y_t taken from the teacher's own logits. Divergent positions carry
    the teacher's greedy continuation (equal to `generate` from the re-encoded prefix), surface ones none; both
    threshold modes (decided per batch, or after every D_t is known)."""
    from opd_tasks.backends.hf import generate, load_causal_lm

    store: ArtifactStore = env["store"]
    cfg = AnalysisConfig(detector="swap", window=3, probe_tokens=4, probe_budget=2, delta_mode=delta_mode,
                         delta=0.0 if delta_mode == "absolute" else 0.5, batch_size=4)
    ref = _analyze(env, cfg)
    probes = store.read_table(ref, "probes").to_pylist()
    tokens = {(r["prompt_id"], r["sample_id"], r["pos"]): r for r in store.read_table(ref, "tokens").to_pylist()}
    roll = {(r["prompt_id"], r["sample_id"]): r for r in store.read_table(env["roll"]).to_pylist()}
    t_lm = load_causal_lm(env["teacher"].path, torch.device("cpu"), "float32")

    def logp(prefix: list[int], cont: list[int]) -> list[float]:
        out = []
        with torch.no_grad():
            for j, tok in enumerate(cont):
                logits = t_lm(input_ids=torch.tensor([prefix + cont[:j]])).logits[0, -1]
                out.append(float(torch.log_softmax(logits, -1)[tok]))
        return out

    assert len(probes) > 4 and {p["distance_kind"] for p in probes} == {"swap"}
    regimes = set()
    for p in probes:
        r = roll[(p["prompt_id"], p["sample_id"])]
        t, y = p["pos"], r["token_ids"]
        prefix = r["prompt_token_ids"] + y[:t]
        with torch.no_grad():
            logits = t_lm(input_ids=torch.tensor([prefix])).logits[0, -1]
        logits[y[t]] = -float("inf")
        alt = int(logits.argmax())
        fut = y[t + 1 : t + 4]
        want = (sum(a - b for a, b in zip(logp(prefix + [y[t]], fut), logp(prefix + [alt], fut), strict=True))
                / len(fut)) if fut else 0.0
        assert p["distance"] == pytest.approx(want, abs=1e-4)
        regime = tokens[(p["prompt_id"], p["sample_id"], t)]["regime"]
        regimes.add(regime)
        assert p["student_continuation"] == []
        if regime == "divergent":
            g = generate(t_lm, [prefix], eos_token_id=2, pad_token_id=0, n=1, temperature=0.0, max_new_tokens=4,
                         progress=False)[0]
            assert p["teacher_continuation"] == g.token_ids
        else:
            assert regime == "surface" and p["teacher_continuation"] == []
    assert regimes == {"surface", "divergent"}
    # Without the bridge (opd_suppress) no continuation is generated at all.
    sup = _analyze(env, cfg, method="opd_suppress")
    assert all(p["teacher_continuation"] == [] for p in store.read_table(sup, "probes").to_pylist())


@pytest.mark.parametrize("method", ["topd", "opd_suppress"])
def test_oracle_regimes_are_the_roles_mapping_whatever_delta_says(env, method: str) -> None:
    """The positive control: every high-loss token whose ground-truth role is known is classified by it (form,
    filler -> surface; reasoning, answer, fork -> divergent; D_t = -1 / +1, threshold 0 even with delta 5), an
    `unknown` one stays unprobed; each divergent position carries the teacher's greedy continuation (equal to
    `generate` from the re-encoded prefix) when the method has a bridge, none otherwise."""
    from opd_tasks.backends.hf import generate, load_causal_lm
    from opd_tasks.topd.signals import TRUE_REGIME

    store, roll_ref, scores = _written_rollouts(env)
    cfg = AnalysisConfig(detector="oracle", probe_tokens=4, delta=5.0, high_loss_quantile=0.5)
    ref = _analyze(env, cfg, method=method, label_roles=True, rollouts=roll_ref, scores=scores)
    rows = store.read_table(ref, "tokens").to_pylist()
    high = [r for r in rows if r["high_loss"]]
    assert {r["role"] for r in high} >= {"form", "reasoning", "answer", "fork", "filler"}
    for r in rows:
        want = TRUE_REGIME.get(r["role"], "unprobed") if r["high_loss"] else "normal"
        assert r["regime"] == want, r
        if r["regime"] in ("surface", "divergent"):
            assert r["near_future_div"] == (1.0 if want == "divergent" else -1.0)
    probes = store.read_table(ref, "probes").to_pylist()
    assert len(probes) == sum(r["regime"] in ("surface", "divergent") for r in rows)
    assert {p["distance_kind"] for p in probes} == {"oracle"} and store.manifest(ref)["meta"]["delta"] == 0.0
    roll = {(r["prompt_id"], r["sample_id"]): r for r in store.read_table(roll_ref).to_pylist()}
    t_lm = load_causal_lm(env["teacher"].path, torch.device("cpu"), "float32")
    for p in probes:
        if p["distance"] > 0 and method == "topd":
            r = roll[(p["prompt_id"], p["sample_id"])]
            g = generate(t_lm, [r["prompt_token_ids"] + r["token_ids"][: p["pos"]]], eos_token_id=2, pad_token_id=0,
                         n=1, temperature=0.0, max_new_tokens=4, progress=False)[0]
            assert p["teacher_continuation"] == g.token_ids
        else:
            assert p["teacher_continuation"] == []
    with pytest.raises(ConfigError, match="'oracle' reads the testbed's ground-truth token roles"):
        _analyze(env, cfg, method=method, label_roles=False, rollouts=roll_ref, scores=scores)


def _written_rollouts(env):
    """Rollouts whose completions are testbed text in the fork students' styles (premature stops, fillers, every
    role), as a `rollouts` artifact with made-up sampling log-probs, scored by the tiny teacher."""
    import random

    from opd_tasks.testbed.styles import get_style
    from opd_tasks.testbed.task import Problem, render_completion
    from opd_tasks.testbed.tokenizer import build_tokenizer

    store, tok, rng = env["store"], build_tokenizer(), random.Random(0)
    rows = []
    for i in range(12):
        p = Problem((100 + 37 * i, 205 + 11 * i))
        style = get_style("student_consequential" if i % 2 else "student_harmless")
        ids = tok(render_completion(p, style, rng), add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append({"prompt_id": f"p{i}", "sample_id": 0, "prompt_token_ids": tok(p.prompt).input_ids,
                     "token_ids": ids, "logprobs": [-rng.random() for _ in ids], "text": tok.decode(ids),
                     "finish_reason": "stop", "reward": 1.0, "teacher_prompt_token_ids": None})
    table = pa.Table.from_pylist(rows)
    roll = store.put_table("rollout", "0a" * 32, "rollouts", table)
    return store, roll, _score(store, env["teacher"], env["student"], roll, top_k=4)


def test_swap_never_probes_the_last_token_and_keys_on_the_bridge(env) -> None:
    """A last token has no near future to re-read: with a budget that covers every high-loss token, swap probes
    all of them except the last ones, which stay `unprobed` (weight 1). And whether the bridge is trained is
    part of the analysis key: with topd.bridge_weight 0 no continuation is generated, with > 0 every divergent position
    has one, and the two are different artifacts."""
    store: ArtifactStore = env["store"]
    cfg = AnalysisConfig(detector="swap", window=3, probe_tokens=4, probe_budget=1000, high_loss_quantile=0.5)
    with_bridge = _analyze(env, cfg, topd=TopdConfig(bridge_weight=0.1))
    no_bridge = _analyze(env, cfg, topd=TopdConfig(bridge_weight=0.0))
    assert with_bridge.key != no_bridge.key
    rows = store.read_table(with_bridge, "tokens").to_pylist()
    last = {(r["prompt_id"], r["sample_id"]): r["pos"] for r in rows
            if r["pos"] == max(x["pos"] for x in rows if (x["prompt_id"], x["sample_id"]) == (r["prompt_id"],
                                                                                            r["sample_id"]))}
    high_last = [r for r in rows if r["high_loss"] and r["pos"] == last[(r["prompt_id"], r["sample_id"])]]
    assert high_last and all(r["regime"] == "unprobed" for r in high_last)
    others = [r for r in rows if r["high_loss"] and r["pos"] != last[(r["prompt_id"], r["sample_id"])]]
    assert others and all(r["regime"] in ("surface", "divergent") for r in others)
    regime = {(r["prompt_id"], r["sample_id"], r["pos"]): r["regime"] for r in rows}
    for ref, bridged in ((with_bridge, True), (no_bridge, False)):
        for p in store.read_table(ref, "probes").to_pylist():
            div = regime[(p["prompt_id"], p["sample_id"], p["pos"])] == "divergent"
            assert bool(p["teacher_continuation"]) == (bridged and div)


def test_greedy_of_a_subset_equals_the_full_batch(env) -> None:
    """`PrefixCache.greedy(only=...)` (the swap detector's bridges) gives the same continuations as greedy over
    every prefix, with an EOS that some probes emit early (so the batch is compacted on the way)."""
    from opd_tasks.backends.hf import load_causal_lm
    from opd_tasks.backends.prefix_cache import PrefixCache

    roll = env["store"].read_table(env["roll"]).to_pylist()
    seqs = [r["prompt_token_ids"] + r["token_ids"] for r in roll]
    probes = [(i, len(r["prompt_token_ids"]) + j) for i, r in enumerate(roll)
              for j in range(min(3, len(r["token_ids"])))]
    model = load_causal_lm(env["teacher"].path, torch.device("cpu"), "float32")
    with torch.no_grad():
        pre = PrefixCache(model, seqs, probes, 0)
        first, _ = pre.greedy(6, -1)  # no EOS: every probe runs 6 tokens
        eos = first[0][0]  # a token some probes emit at once: they finish at step 0
        full, full_lp = pre.greedy(6, eos)
        assert any(len(c) == 1 for c in full) and any(len(c) > 1 for c in full)
        only = [5, 1, len(probes) - 1, 0]
        sub, sub_lp = pre.greedy(6, eos, only=only)
        assert sub == [full[j] for j in only]
        for a, j in zip(sub_lp, only, strict=True):
            assert a == pytest.approx(full_lp[j], abs=1e-6)
        assert pre.greedy(6, eos, only=[]) == ([], [])
        again, _ = pre.greedy(6, eos)  # the cache is restored to the prefixes after each call
        assert again == full


def test_delta_zero_with_another_detector_warns(env, caplog) -> None:
    """delta 0 (absolute) is swap's natural threshold; for the window detector it is a mistake worth a warning."""
    cfg = AnalysisConfig(detector="window", delta_mode="absolute", delta=0.0)
    with caplog.at_level("WARNING", logger="opd_tasks.stages.analyze"):
        _analyze(env, cfg)
    assert "analysis.delta is 0 (absolute)" in caplog.text and "window detector" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="opd_tasks.stages.analyze"):
        _analyze(env, AnalysisConfig(detector="swap", window=3))
    assert "analysis.delta is 0" not in caplog.text


def test_swap_detector_needs_the_teachers_top_2(env, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "root")
    copy_artifact(env["store"], env["roll"], store)
    roll = store.lookup("rollout", env["roll"].key)
    scores = _score(store, env["teacher"], env["student"], roll, top_k=1)
    with pytest.raises(ConfigError, match=r"analysis.detector 'swap' needs .*scoring.top_k >= 2"):
        _analyze(env, AnalysisConfig(detector="swap"), store=store, rollouts=roll, scores=scores)


def test_analyze_rerun_is_byte_identical(env) -> None:
    cfg = AnalysisConfig(probe_tokens=4, probe_budget=1)
    a = _analyze(env, cfg)
    other = ArtifactStore(env["base"] / "other")
    # Copy the input artifacts into a fresh store: the stage recomputes from scratch there.
    for ref in (env["roll"], env["scores"]):
        copy_artifact(env["store"], ref, other)
    r2, s2 = other.lookup("rollout", env["roll"].key), other.lookup("score", env["scores"].key)
    assert (r2.sha256, s2.sha256) == (env["roll"].sha256, env["scores"].sha256)
    b = _analyze(env, cfg, store=other, rollouts=r2, scores=s2)
    assert a.sha256 == b.sha256 and other.published[-1] == b  # recomputed in `other`


def test_zero_weights_freeze_the_pg_update(env) -> None:
    """All tokens suppressed (weight 0) and no bridge: the policy gradient is zero, the weights do not move."""
    store = env["store"]
    ref = _analyze(env, AnalysisConfig(detector="window"), method="opd_suppress")
    t = store.read_table(ref, "tokens")
    zero = t.set_column(t.column_names.index("weight"), "weight", pa.array([0.0] * t.num_rows, pa.float32()))
    with store.writer("analyze", "ab" * 32) as w:
        w.write_table("tokens", zero)
        w.declare_table("probes")
        zref = w.commit()
    up = _update(env, UpdateConfig(learning_rate=0.1), zref, method="opd_suppress")
    from safetensors.torch import load_file

    a = load_file(str(Path(env["student"].path) / "model.safetensors"))
    b = load_file(str(Path(store.checkpoint_dir(up)) / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert store.read_table(up, "updates").column("weighted_tokens")[0].as_py() == 0


def test_bridge_loss_equals_explicit_reference(env) -> None:
    store = env["store"]
    cfg = AnalysisConfig(detector="probe", probe_tokens=4, probe_budget=2, delta=0.0,
                         delta_mode="absolute")  # every probe divergent
    topd = TopdConfig(bridge_weight=0.3, bridge_decay=0.7)
    ref = _analyze(env, cfg, topd=topd)
    probes = store.read_table(ref, "probes").to_pylist()
    assert probes
    up = _update(env, UpdateConfig(learning_rate=1e-9, micro_batch_size=64), ref, topd=topd)
    logged = store.read_table(up, "updates").to_pylist()
    assert len(logged) == 1
    roll = {(r["prompt_id"], r["sample_id"]): r for r in store.read_table(env["roll"]).to_pylist()}
    n_tok = sum(len(r["token_ids"]) for r in roll.values())
    from opd_tasks.backends.hf import load_causal_lm

    model = load_causal_lm(env["student"].path, torch.device("cpu"))
    ref_sum = 0.0
    for p in probes:  # one unpadded forward per continuation token
        r = roll[(p["prompt_id"], p["sample_id"])]
        prefix = r["prompt_token_ids"] + r["token_ids"][: p["pos"]]
        for j, c in enumerate(p["teacher_continuation"]):
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([prefix + p["teacher_continuation"][:j]])).logits[0, -1], -1)
            ref_sum += -(0.7**j) * lp[c].item()
    assert logged[0]["bridge_loss"] == pytest.approx(ref_sum / n_tok, rel=1e-4)
    assert logged[0]["loss"] == pytest.approx(logged[0]["distill_loss"] + 0.3 * logged[0]["bridge_loss"], rel=1e-4)
    meta = json.loads((store.path_of(ref) / "_manifest.json").read_text())["meta"]
    assert meta["share"]["divergent"] > 0


def test_bridge_gradient_through_cached_prefixes_equals_reencoding(env) -> None:
    """The bridge term continues from the main forward's keys/values; its gradient must equal the gradient of
    the same sum computed by encoding prefix + continuation afresh, one bridge at a time with no padding.
    Token weights are 0, so the policy-gradient term contributes nothing."""
    from opd_tasks.backends.hf import load_causal_lm
    from opd_tasks.training.objective import micro_batch_loss
    from opd_tasks.training.sequences import ScoredSequence

    roll = env["store"].read_table(env["roll"]).to_pylist()[:3]
    batch = []
    for i, r in enumerate(roll):
        n = len(r["token_ids"])
        br = [(pos, [3 + i, 5, 7][: 1 + (pos % 3)]) for pos in sorted({0, n // 2, n - 1})]
        batch.append(ScoredSequence(r["prompt_id"], r["sample_id"], r["prompt_token_ids"], r["token_ids"], [0.0] * n,
                                    [0.0] * n, weights=[0.0] * n, bridges=br))
    model = load_causal_lm(env["student"].path, torch.device("cpu"), "float32").train()
    loss, stats = micro_batch_loss(model, batch, UpdateConfig(old_logprobs="sampler"),
                                   Bridge(weight=1.0, decay=0.7), 0, torch.device("cpu"))
    loss.backward()
    got = {k: v.grad.clone() for k, v in model.named_parameters()}
    model.zero_grad()
    ref = 0.0
    for s in batch:
        for pos, cont in s.bridges:
            ids = torch.tensor([s.prompt + s.tokens[:pos] + cont[:-1]])
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            start = len(s.prompt) + pos - 1
            for j, c in enumerate(cont):
                ref = ref - 0.7**j * lp[start + j, c]
    ref.backward()
    assert stats["bridge"] == pytest.approx(ref.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)  # the pg term is 0
    for k, v in model.named_parameters():
        torch.testing.assert_close(got[k], v.grad, atol=1e-5, rtol=1e-4, msg=k)
    assert any(float(g.abs().sum()) > 0 for g in got.values())


def test_xent_probe_distance_matches_a_slow_teacher_forced_loop(env) -> None:
    """Each stored xent distance equals 0.5 * (mean_j[log T(c_T) - log S(c_T)] + mean_j[log S(c_S) - log T(c_S)]),
    recomputed here one token at a time with a full forward over prefix + continuation[:j] (no KV cache, no
    batching, no padding), for both models' continuations."""
    from opd_tasks.backends.hf import load_causal_lm

    store: ArtifactStore = env["store"]
    cfg = AnalysisConfig(detector="probe", distance="xent", probe_tokens=4, probe_budget=2)
    ref = _analyze(env, cfg)
    probes = store.read_table(ref, "probes").to_pylist()
    assert probes
    roll = {(r["prompt_id"], r["sample_id"]): r for r in store.read_table(env["roll"]).to_pylist()}
    cpu = torch.device("cpu")
    s_lm = load_causal_lm(env["student"].path, cpu, "float32")
    t_lm = load_causal_lm(env["teacher"].path, cpu, "float32")

    def logp(model, prefix: list[int], cont: list[int]) -> list[float]:
        out = []
        with torch.no_grad():
            for j, tok in enumerate(cont):
                ids = torch.tensor([prefix + cont[:j]])
                out.append(float(torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)[tok]))
        return out

    for p in probes[:8]:
        r = roll[(p["prompt_id"], p["sample_id"])]
        prefix = r["prompt_token_ids"] + r["token_ids"][: p["pos"]]
        ct, cs = p["teacher_continuation"], p["student_continuation"]
        assert cs == r["token_ids"][p["pos"] : p["pos"] + 4]  # the faithful probe: what the student wrote
        gap_t = sum(a - b for a, b in zip(logp(t_lm, prefix, ct), logp(s_lm, prefix, ct), strict=True)) / len(ct)
        gap_s = sum(a - b for a, b in zip(logp(s_lm, prefix, cs), logp(t_lm, prefix, cs), strict=True)) / len(cs)
        assert p["distance"] == pytest.approx(0.5 * (gap_t + gap_s), abs=1e-4)


@pytest.mark.parametrize("batch_size", [3, 256])
def test_realised_probe_with_input_embedding_ot_matches_a_slow_reference(env, batch_size: int) -> None:
    """The faithful probe with `ot`: the student's side is its realised y_t..y_{t+K-1}, the teacher's its greedy
    continuation (equal to `generate` from the re-encoded prefix), and the distance equals Sinkhorn on a cosine
    cost matrix built here with plain loops over the student's input embedding rows."""
    import math

    from opd_tasks.backends.hf import generate, load_causal_lm
    from opd_tasks.topd.ot import sinkhorn

    store: ArtifactStore = env["store"]
    cfg = AnalysisConfig(detector="probe", distance="ot", probe_tokens=5, probe_budget=2, batch_size=batch_size)
    ref = _analyze(env, cfg)
    probes = store.read_table(ref, "probes").to_pylist()
    assert probes and {p["distance_kind"] for p in probes} == {"ot"}
    roll = {(r["prompt_id"], r["sample_id"]): r for r in store.read_table(env["roll"]).to_pylist()}
    s_lm = load_causal_lm(env["student"].path, torch.device("cpu"), "float32")
    t_lm = load_causal_lm(env["teacher"].path, torch.device("cpu"), "float32")
    table = s_lm.get_input_embeddings().weight.detach().double().tolist()
    for p in probes:
        r = roll[(p["prompt_id"], p["sample_id"])]
        prefix = r["prompt_token_ids"] + r["token_ids"][: p["pos"]]
        assert p["student_continuation"] == r["token_ids"][p["pos"] : p["pos"] + 5]
        g = generate(t_lm, [prefix], eos_token_id=2, pad_token_id=0, n=1, temperature=0.0, max_new_tokens=5,
                     progress=False)[0]
        assert p["teacher_continuation"] == g.token_ids

        def cos(u, v):
            norm = math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))
            return sum(x * y for x, y in zip(u, v, strict=True)) / norm

        cost = torch.tensor([[1.0 - cos(table[a], table[b]) for b in p["student_continuation"]]
                             for a in p["teacher_continuation"]], dtype=torch.float64)
        assert p["distance"] == pytest.approx(float(sinkhorn(cost)[1]), abs=1e-5)


def test_input_embedding_ot_ranks_a_separator_fork_below_a_wrong_digit_and_an_early_stop() -> None:
    """Hand-built probes of `Q: 123+489=?` in the committed student's input embeddings, the teacher's greedy
    continuation against what the student wrote from the same prefix: after `3+9+0=12`, another separator (a
    surface fork) or a stop and a direct answer (the consequential fork); after `3+9+0=12 ; 2+8+1=1`, a wrong
    digit that the answer then carries."""
    from opd_tasks.config import ModelRef
    from opd_tasks.models import load_model, load_tokenizer
    from opd_tasks.topd.detectors import input_embedding_ot

    tok, model = load_tokenizer(ModelRef(path="testbed:student")), load_model(ModelRef(path="testbed:student"))

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids[:16]

    teacher = ids(" ; 2+8+1=11 ; 1+4+1=6 so 612.")
    separator = input_embedding_ot(model, teacher, ids(" then 2+8+1=11 ; 1+4+1=6 so 612."))
    stop = input_embedding_ot(model, teacher, ids(" so 612."))
    digit = input_embedding_ot(model, ids("1 ; 1+4+1=6 so 612."), ids("2 ; 1+4+1=6 so 622."))
    assert separator < digit < stop, (separator, digit, stop)
    assert input_embedding_ot(model, teacher, teacher) == pytest.approx(0.0, abs=2e-3)


def test_probe_greedy_from_cached_prefixes_equals_generate_and_teacher_forcing(env) -> None:
    """`probe_greedy` (prefix keys/values sliced from one forward over the full sequence) gives the same greedy
    continuations as `hf.generate` from re-encoded prefixes, the same log-probs, and in scoring mode the same
    log-probs as `hf.score_sequences` (teacher forcing over prefix + continuation)."""
    import random

    from opd_tasks.backends.hf import generate, load_causal_lm, score_sequences
    from opd_tasks.topd.probes import probe_greedy

    roll = env["store"].read_table(env["roll"]).to_pylist()
    seqs = [r["prompt_token_ids"] + r["token_ids"] for r in roll]
    rng = random.Random(0)
    probes = [(i, rng.randrange(len(r["prompt_token_ids"]), len(seqs[i]))) for i, r in enumerate(roll)
              for _ in range(2)]
    prefixes = [seqs[i][:n] for i, n in probes]
    model = load_causal_lm(env["teacher"].path, torch.device("cpu"), "float32")
    kw = dict(eos_token_id=2, pad_token_id=0)
    ref = generate(model, prefixes, n=1, temperature=0.0, max_new_tokens=6, batch_size=5, progress=False, **kw)
    conts, lps = probe_greedy(model, seqs, probes, 6, batch_size=3, **kw)  # batches not aligned with generate's
    assert conts == [g.token_ids for g in ref]
    for a, g in zip(lps, ref, strict=True):
        assert a == pytest.approx(g.logprobs, abs=1e-5)
    # An "EOS" that the model emits early in some probes: those stop there, the others run on (ragged batch).
    eos = conts[0][1] if len(conts[0]) > 1 else conts[0][0]
    ref_e = generate(model, prefixes, eos_token_id=eos, pad_token_id=0, n=1, temperature=0.0, max_new_tokens=6,
                     batch_size=5, progress=False)
    conts_e, lps_e = probe_greedy(model, seqs, probes, 6, eos_token_id=eos, pad_token_id=0, batch_size=3)
    assert conts_e == [g.token_ids for g in ref_e] and any(len(c) < 6 for c in conts_e)
    assert any(len(c) == 6 for c in conts_e) or all(c[-1] == eos for c in conts_e)
    for a, g in zip(lps_e, ref_e, strict=True):
        assert a == pytest.approx(g.logprobs, abs=1e-5)
    other = [list(reversed(c)) for c in conts]  # any tokens, not the model's own choice
    _, scored = probe_greedy(model, seqs, probes, 6, batch_size=4, score=other, **kw)
    tf = score_sequences(model, prefixes, other, pad_token_id=0, top_k=1, batch_size=7, progress=False)
    for a, s in zip(scored, tf, strict=True):
        assert a == pytest.approx(s.logprob, abs=1e-5)


def test_every_k1_from_arrow_equals_the_sequences_k1(env) -> None:
    """The k1 a shard computes the high-loss cut from (two log-prob columns joined in Arrow) is, value for value,
    the k1 of every scored sequence (float64 of the float32 columns)."""
    from types import SimpleNamespace

    from opd_tasks.stages.analyze import every_k1, k1_of
    from opd_tasks.training.sequences import scored_sequences

    got = every_k1(SimpleNamespace(store=env["store"]), SimpleNamespace(rollouts=env["roll"], scores=env["scores"]))
    want = np.concatenate([k1_of(s) for s in scored_sequences(env["store"], env["roll"], env["scores"])])
    assert len(got) == len(want) > 50 and np.array_equal(np.sort(got), np.sort(want))


SHARDED_ANALYSES = {  # (analysis settings, ground-truth roles): every detector, and each way delta is decided
    "swap, absolute delta, bridges as it goes": ({"detector": "swap"}, False),
    "swap, quantile delta, bridges in the merge": ({"detector": "swap", "delta": 0.5, "delta_mode": "quantile"},
                                                   False),
    "probe xent realised, quantile delta": ({"detector": "probe", "delta": 0.5, "delta_mode": "quantile"}, True),
    "probe ot greedy": ({"detector": "probe", "distance": "ot", "probe_student": "greedy", "delta": 0.3}, False),
    "window": ({"detector": "window", "delta": 0.5, "delta_mode": "quantile"}, True),
    "oracle": ({"detector": "oracle"}, True),
    "rkl_topk with a threshold": ({"detector": "swap", "loss_signal": "rkl_topk", "high_loss_threshold": 0.001},
                                  False),
    # these random models' top-k reverse KL is under the default floor (0.05 nats) everywhere: no floor here
    "rkl_topk with a quantile: one part": ({"detector": "swap", "loss_signal": "rkl_topk", "min_high_loss": 0.0},
                                           False),
}


@pytest.mark.parametrize("name", list(SHARDED_ANALYSES))
def test_sharded_analysis_is_byte_identical_to_the_whole(env, tmp_path: Path, name: str) -> None:
    """The analysis in 2 and in 3 shards (blocks of 3 of the 10 sequences: 4 blocks) publishes the same artifact,
    byte for byte, as in one: its high-loss cut, delta, regimes, weights and bridges are the batch's, not a
    shard's. With rkl_topk and a quantile the stage cannot split and runs as one part."""
    import shutil

    from opd_tasks.pipeline import LocalExecutor
    from opd_tasks.stages import StageContext, plan_call
    from opd_tasks.stages.registry import part_stage

    settings, roles = SHARDED_ANALYSES[name]
    p = plan(RunConfig(method="topd"))
    inputs = AnalyzeInputs(student=env["student"], teacher=env["teacher"], rollouts=env["roll"],
                           scores=env["scores"], analysis=AnalysisConfig(batch_size=3, probe_tokens=4, probe_budget=2,
                                                                         **settings),
                           weighting=p.weighting, bridge=True, label_roles=roles, seed=0)
    key = ANALYZE.key(inputs)
    sha = {}
    for n in (1, 2, 3):
        root = tmp_path / f"n{n}"
        shutil.copytree(env["store"].root, root, ignore=shutil.ignore_patterns(ANALYZE.name, part_stage(ANALYZE.name)))
        store = ArtifactStore(root)
        ctx = plan_call(ANALYZE, StageContext(str(root), None, ANALYZE.name, key, "cpu"), inputs, shards=n)
        ref = LocalExecutor().run(ANALYZE, ctx, inputs, list(ctx.spans))
        sha[n] = ref.sha256
        made = root / "artifacts" / part_stage(ANALYZE.name)
        count = len([d for d in made.iterdir() if not d.name.startswith(".")]) if made.is_dir() else 0
        assert count == (0 if n == 1 or "one part" in name else n)
        if n == 1:
            meta = store.manifest(ref)["meta"]
            assert meta["high_loss"] > 0 and sum(meta["share"].values()) > 0
            probes = store.read_table(ref, "probes")
            if settings["detector"] != "window":  # the detector examined positions (oracle: those with a role)
                assert probes.num_rows > (0 if settings["detector"] == "oracle" else 4)
            if name.startswith("swap, quantile"):  # the merge's bridges exist, and only at divergent positions
                bridged = [bool(c) for c in probes.column("teacher_continuation").to_pylist()]
                assert any(bridged) and not all(bridged)
    assert sha[2] == sha[1] and sha[3] == sha[1], name
