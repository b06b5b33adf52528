"""`opd report` over real runs of the committed testbed models (plain driver, tiny settings): every figure's
query is checked against an independent computation from the artifacts themselves (evals tables, analysis
manifests), the files are complete and self-contained, and (slow) the HTML opens in headless Chromium with
every image loaded."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from opd_tasks.config_files import load_config
from opd_tasks.errors import ConfigError
from opd_tasks.report import build_report, collect, select_runs, summarize, verdict
from storage.lineage import RunLineage
from storage.store import ArtifactStore

METHODS = ("opd", "topd")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from opd_tasks.pipeline import run_plain

    root = tmp_path_factory.mktemp("report-root")
    for seed in SEEDS:
        for m in METHODS:
            cfg = load_config(None, [f"method={m}", f"seed={seed}", "iterations=1", f"root={root}",
                                     f"name=exp-{m}-s{seed}", "data.eval_size=16", "data.prompts_per_iteration=6",
                                     "data.testbed.fork=consequential",  # premature stops for the fork queries
                                     "rollout.samples_per_prompt=2", "rollout.max_new_tokens=40",
                                     "evaluation.max_new_tokens=40"])
            run_plain(cfg, log=lambda _m: None, progress=False)
    return root


def test_accuracy_query_matches_the_evals_artifacts(root: Path) -> None:
    runs = select_runs(root, ["exp-*"])
    assert sorted((r.method, r.seed) for r in runs) == sorted((m, s) for m in METHODS for s in SEEDS)
    data = collect(root, runs)
    store = ArtifactStore(root)
    expected = {}
    for r in runs:
        for e in RunLineage(root, r.run).entries():
            if e.stage in ("baseline", "evaluate"):
                correct = store.read_table(e.ref, "evals").column("correct").to_pylist()
                step = 0 if e.stage == "baseline" else e.iteration + 1
                expected[(r.run, step)] = sum(1 for c in correct if c) / len(correct)
    got = {(a["run"], a["step"]): a["accuracy"] for a in data["accuracy"]}
    assert got.keys() == expected.keys() and len(got) == len(runs) * 2
    for k, v in expected.items():
        assert got[k] == pytest.approx(v)


def test_classifier_and_regime_queries_match_each_analysis_manifest(root: Path) -> None:
    """The SQL (report_sql/classifier.sql, regimes.sql) and the analysis stage's Python
    (analyze.classifier_scores, meta.share) are two implementations of one definition: they must agree."""
    store = ArtifactStore(root)
    for seed in SEEDS:
        run = f"exp-topd-s{seed}"
        data = collect(root, select_runs(root, [run]))
        for e in RunLineage(root, run).entries():
            if e.stage != "analyze":
                continue
            meta = store.manifest(e.ref)["meta"]
            row = next(c for c in data["classifier"] if c["iteration"] == e.iteration)
            assert row["classified"] == meta["classifier"]["classified"]
            for k in ("surface_precision", "surface_recall", "divergent_precision", "divergent_recall"):
                assert row[k] == pytest.approx(meta["classifier"][k]), k
            shares = {r["regime"]: r["share"] for r in data["regimes"] if r["iteration"] == e.iteration}
            for regime, share in meta["share"].items():
                assert shares.get(regime, 0.0) == pytest.approx(share), regime


def test_report_is_complete_and_self_contained(root: Path, tmp_path: Path) -> None:
    rep = build_report(root, ["exp-*"], out=tmp_path / "rep", log=lambda _m: None)
    page = rep.html.read_text()
    figs = json.loads((rep.out / "report.json").read_text())["figures"]
    assert [f["file"] for f in figs] == ["accuracy.png", "reverse_kl.png", "regimes.png", "classifier.png", "costs.png"]
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == len(figs) and "src=\"http" not in page and "src=\"/" not in page
    for u, f in zip(uris, figs, strict=True):
        raw = base64.b64decode(u)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw == (rep.out / f["file"]).read_bytes()
    md = rep.markdown.read_text()
    for f in figs:
        assert f"![{f['file']}]({f['file']})" in md
    # the summary: final accuracy per method = mean over seeds of each run's last evaluation
    store = ArtifactStore(root)
    for m in METHODS:
        finals = []
        for s in SEEDS:
            e = RunLineage(root, f"exp-{m}-s{s}").get(0, "evaluate")
            finals.append(statistics.mean(store.read_table(e.ref, "evals").column("correct").to_pylist()))
        assert rep.summary["methods"][m]["final_mean"] == pytest.approx(statistics.mean(finals))
        assert rep.summary["methods"][m]["final_min"] == pytest.approx(min(finals))
    assert rep.summary["methods"]["opd"]["surface_share"] is None  # opd runs no analysis
    assert rep.summary["verdict"]["text"] in page and rep.summary["verdict"]["text"] in md
    # token examples: highlighted high-loss tokens, and the probe continuations at probed positions
    assert page.count('class="tok surface"') + page.count('class="tok divergent"') >= 2
    assert 'class="probe"' in page and "[teacher:" in page
    # what computed the artifacts: every one of them in this environment (their manifests' provenance)
    from opd_tasks.provenance import library_versions

    envs = json.loads((rep.out / "report.json").read_text())["data"]["environments"]
    here = library_versions()
    assert len(envs) == 1 and f"torch {here['torch']}, transformers {here['transformers']}" in envs[0]["computed_with"]
    assert envs[0]["computed_with"] in md and "## Computed with" in md and "<h2>Computed with</h2>" in page
    n_artifacts = len({e.ref.sha256 for r in select_runs(root, ["exp-*"]) for e in RunLineage(root, r.run).entries()})
    assert envs[0]["artifacts"] == n_artifacts


def test_report_errors_and_replacement(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no run matches 'nope-\*'.*exp-opd-s0"):
        build_report(root, ["nope-*"], log=lambda _m: None)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not a report directory"):
        build_report(root, ["exp-opd-*"], out=foreign, log=lambda _m: None)
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "rep"
    first = build_report(root, ["exp-opd-*"], out=out, log=lambda _m: None)
    assert set(first.summary["methods"]) == {"opd"}
    second = build_report(root, ["exp-*"], out=out, log=lambda _m: None)  # a previous report is replaced whole
    assert set(second.summary["methods"]) == {"opd", "topd"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep")]  # no temp dirs left behind


def test_verdict_and_summary_on_known_numbers() -> None:
    """Known per-seed accuracies: the summary's means and learning-curve areas, the paired comparison (its t-test
    and Wilcoxon figures equal scipy's on the per-seed differences), the bootstrap CI over the shared problems,
    and a verdict that reads the CI."""
    from scipy import stats

    from opd_tasks.report import RunInfo

    runs = [RunInfo(f"{m}-s{s}", m, s) for m in ("opd", "topd") for s in (0, 1, 2)]
    final = {"opd": [0.80, 0.82, 0.84], "topd": [0.90, 0.91, 0.92]}
    acc, problems = [], []
    for r in runs:
        acc += [{"run": r.run, "method": r.method, "seed": r.seed, "step": 0, "accuracy": 0.4},
                {"run": r.run, "method": r.method, "seed": r.seed, "step": 1, "accuracy": final[r.method][r.seed]}]
        right = round(100 * final[r.method][r.seed])  # 100 problems, the first `right` of them correct
        problems += [{"run": r.run, "step": 1, "prompt_id": f"q{j:03d}", "correct": float(j < right)}
                     for j in range(100)]
    data = {"accuracy": acc, "problems": problems, "regimes": [
        {"method": "topd", "iteration": 0, "regime": "surface", "tokens": 3, "share": 0.3},
        {"method": "topd", "iteration": 0, "regime": "divergent", "tokens": 7, "share": 0.7}],
        "classifier": [], "costs": [{"method": "opd", "stage": "rollout", "seconds": 2.0},
                                    {"method": "opd", "stage": "update", "seconds": 1.0}]}
    s = summarize(runs, data)
    assert s["methods"]["topd"]["final_mean"] == pytest.approx(0.91)
    assert s["methods"]["opd"]["final_std"] == pytest.approx(0.02)
    assert s["methods"]["topd"]["area_by_seed"] == pytest.approx({"0": 0.90, "1": 0.91, "2": 0.92})
    assert s["methods"]["topd"]["surface_share"] == pytest.approx(0.3)
    assert s["methods"]["opd"]["seconds_per_iteration"] == pytest.approx(3.0)
    [c] = s["comparisons"]
    assert (c["a"], c["b"]) == ("opd", "topd") and c["final"]["seeds"] == [0, 1, 2]
    ref = stats.ttest_rel(final["topd"], final["opd"])
    assert c["final"]["mean_diff"] == pytest.approx(0.09) and c["final"]["t_p"] == pytest.approx(ref.pvalue)
    assert c["final"]["wilcoxon_p"] == pytest.approx(stats.wilcoxon(final["topd"], final["opd"]).pvalue)
    lo, hi = c["final"]["bootstrap_ci95"]
    assert 0 < lo < 0.09 < hi < 0.2  # every seed's difference is positive: the interval is above 0
    v = s["verdict"]
    assert v["topd_wins"] and v["topd_minus_opd"] == pytest.approx(0.09) and v["ci95"] == pytest.approx([lo, hi])
    assert "TOPD beats OPD" in v["text"] and "3 seeds" in v["text"]
    # a difference whose sign flips over seeds: no difference resolved
    mixed = {**data, "accuracy": [a | {"accuracy": {0: 0.85, 1: 0.80, 2: 0.86}[a["seed"]]}
                                  if a["method"] == "topd" and a["step"] == 1 else a for a in acc], "problems": []}
    v = summarize(runs, mixed)["verdict"]
    assert not v["topd_wins"] and v["text"].startswith("No difference resolved") and "(paired t)" in v["text"]
    assert verdict(None) is None
    # one seed: no verdict (a +1 point difference is not a win)
    one = summarize(runs[:1] + runs[3:4], {**data, "accuracy": [a for a in acc if a["seed"] == 0]})
    assert one["verdict"]["topd_wins"] is False and "single seed" in one["verdict"]["text"]
    # runs of different lengths are compared at the last step every run reached, and the summary says so
    longer = acc + [{"run": "opd-s0", "method": "opd", "seed": 0, "step": 2, "accuracy": 0.99}]
    s2 = summarize(runs, {**data, "accuracy": longer})
    assert s2["final_step"] == 1 and "differ in length" in s2["note"]
    assert s2["methods"]["opd"]["final_mean"] == pytest.approx(0.82)


CHECK_IMAGES = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', imgs.length + '/' + ok);
});
</script></body>"""


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("OPD_REQUIRE_CHROMIUM") == "1":
        pytest.fail("OPD_REQUIRE_CHROMIUM=1 but no chromium on PATH (.ci/run installs Debian's chromium)")
    return found


def _loaded_images(browser: str, page: Path, tmp: Path) -> tuple[int, int]:
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=10000", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'data-images="(\d+)/(\d+)"', out.stdout)
    assert m, f"chromium did not render the page: rc {out.returncode}\n{out.stderr[-2000:]}"
    return int(m.group(1)), int(m.group(2))


@pytest.mark.slow
def test_report_opens_in_headless_chromium_with_every_image_loaded(root: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH: install Debian's chromium (.ci/run does) to run the browser test")
    rep = build_report(root, ["exp-*"], out=tmp_path / "rep", log=lambda _m: None)
    checked = tmp_path / "checked.html"
    checked.write_text(rep.html.read_text().replace("</body>", CHECK_IMAGES))
    total, ok = _loaded_images(browser, checked, tmp_path)
    assert total == 5 and ok == total
    # the check can fail: one broken image is seen as not loaded
    broken = tmp_path / "broken.html"
    broken.write_text(rep.html.read_text().replace("</body>", '<img src="data:image/png;base64,AAAA">'
                                                               + CHECK_IMAGES))
    total, ok = _loaded_images(browser, broken, tmp_path)
    assert total == 6 and ok == 5


def test_opd_report_command(root: Path, tmp_path: Path) -> None:
    """The CLI: a report over a pattern prints the summary and the verdict and writes the files; a pattern that
    matches nothing and an unknown experiment method are clear errors (exit 2), not tracebacks."""
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    out = tmp_path / "cli-report"
    r = runner.invoke(app, ["report", "exp-*", "--root", str(root), "--out", str(out), "--no-publish"])
    assert r.exit_code == 0, r.output
    assert "final accuracy per method over seeds" in r.output and "TOPD" in r.output
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    r = runner.invoke(app, ["report", "missing-*", "--root", str(root), "--no-publish"])
    assert r.exit_code == 2 and "no run matches 'missing-*'" in r.output
    r = runner.invoke(app, ["experiment", "--methods", "opd,sft", "--seeds", "0", "--no-report"])
    assert r.exit_code == 2 and "arm 'sft': the method must be one of opd, opd_suppress, topd" in r.output
    r = runner.invoke(app, ["experiment", "--seeds", "0,x"])
    assert r.exit_code == 2 and "--seeds" in r.output


def test_token_examples_fall_back_to_ids_when_the_tokenizer_is_gone(root: Path, tmp_path: Path, monkeypatch) -> None:
    import opd_tasks.models
    from opd_tasks.errors import ModelError

    def gone(ref, root=None):
        raise ModelError(f"model path {ref.path} does not exist")

    monkeypatch.setattr(opd_tasks.models, "load_tokenizer", gone)
    rep = build_report(root, ["exp-topd-*"], out=tmp_path / "ids", log=lambda _m: None)
    ex = json.loads((rep.out / "report.json").read_text())["examples"]
    assert ex and all(re.fullmatch(r"\[\d+\]", t["text"]) for s in ex["sequences"] for t in s["tokens"])


def test_costs_charge_a_shared_cache_hit_what_computing_it_cost(root: Path) -> None:
    """report_sql/costs.sql: topd's iteration-0 rollout is a cache hit on opd's (same seed); it is charged the
    seconds of the lineage entry that computed that artifact, recomputed here from the lineage files."""
    runs = select_runs(root, ["exp-*"])
    data = collect(root, runs)
    entries = [e for r in runs for e in RunLineage(root, r.run).entries()]
    computed = {e.ref.sha256: e.seconds for e in entries if e.cached is False}
    topd_rollouts = [e for r in runs if r.method == "topd" for e in RunLineage(root, r.run).entries()
                     if e.stage == "rollout"]
    assert topd_rollouts and all(e.cached for e in topd_rollouts)  # shared with opd
    expected = statistics.median(computed[e.ref.sha256] for e in topd_rollouts)
    got = next(c for c in data["costs"] if c["method"] == "topd" and c["stage"] == "rollout")
    assert got["seconds"] == pytest.approx(expected) and got["seconds"] > 0.01


def test_experiment_refuses_a_shorter_rerun_of_a_longer_run(root: Path, tmp_path: Path) -> None:
    """A planned run that already holds more iterations would leave them in its lineage, and the report would
    read them: `check_plan` refuses before anything starts; the same length (a rerun from cache) is fine."""
    from flows.experiment import check_plan

    ref = RunLineage(root, "exp-opd-s0").get(0, "update").ref
    RunLineage(tmp_path, "x-opd-s0").record(2, "update", ref)  # iterations 0..2 done
    cfg = load_config(None, [f"root={tmp_path}", "iterations=2"])
    with pytest.raises(ConfigError, match=r"run 'x-opd-s0' already has 3 iterations, more than the 2 planned"):
        check_plan(["opd"], [0], cfg, "x")
    check_plan(["opd"], [0], load_config(None, [f"root={tmp_path}", "iterations=3"]), "x")
    (tmp_path / "reports" / "x").mkdir(parents=True)
    with pytest.raises(ConfigError, match="is not a report directory"):
        check_plan(["opd"], [0], load_config(None, [f"root={tmp_path}", "iterations=3"]), "x")


def test_experiment_arms_conditions_and_run_names(tmp_path: Path) -> None:
    """An arm is a method with a label and overrides; the plan runs conditions, then seeds, then arms; each run's
    config carries its condition, overrides, method, seed, name and arm label; bad arms fail before anything runs."""
    from flows.experiment import check_plan, parse_arm, run_config, run_plan

    oracle = parse_arm("topd-oracle=topd,analysis.detector=oracle, topd.bridge_weight=0")
    assert oracle == parse_arm("topd-oracle=topd,analysis.detector=oracle,topd.bridge_weight=0")
    assert (oracle.label, oracle.method, oracle.overrides) == ("topd-oracle", "topd", (
        "analysis.detector=oracle", "topd.bridge_weight=0"))
    assert parse_arm("opd") == parse_arm("opd=opd")
    plan = run_plan("e", [parse_arm("opd"), oracle], [3, 4], ["harmless", "consequential"])
    assert [p.run for p in plan][:3] == ["e-harmless-opd-s3", "e-harmless-topd-oracle-s3", "e-harmless-opd-s4"]
    assert [p.run for p in run_plan("e", [parse_arm("opd")], [0])] == ["e-opd-s0"]
    cfg = run_config(load_config(None, [f"root={tmp_path}"]), plan[1])
    assert (cfg.name, cfg.arm, cfg.method, cfg.seed) == ("e-harmless-topd-oracle-s3", "topd-oracle", "topd", 3)
    assert cfg.analysis.detector == "oracle" and cfg.topd.bridge_weight == 0 and cfg.data.testbed.fork == "harmless"
    assert cfg.models.student.path == "testbed:student-harmless"
    for bad, pattern in (("x=ppo", r"the method must be one of opd"), ("x=topd,analysis.detector", "key.path=value"),
                         ("a b=opd", "arm")):
        with pytest.raises(ConfigError, match=pattern):
            parse_arm(bad)
    for outside in ("root=/tmp/elsewhere", "name=x", "seed=1", "data.eval_size=10", "models.student.path=y",
                    "orchestration.shards=2", "iterations=9", "evaluation.max_new_tokens=9"):
        with pytest.raises(ConfigError, match=f"cannot set '{outside.split('=')[0]}': arms set the method and stage"):
            parse_arm(f"x=opd,{outside}")
    with pytest.raises(ConfigError, match="distinct labels"):
        check_plan(["opd", "opd=opd"], [0])
    with pytest.raises(ConfigError, match=r"run e-topd-x-s0 of arm topd-x\):\n  analysis.nope: unknown key"):
        check_plan(["topd-x=topd,analysis.nope=1"], [0], load_config(None, [f"root={tmp_path}"]), "e")


def test_kept_tokens_and_early_stops_match_the_artifacts(root: Path) -> None:
    """The kept-token query against the rollouts and tokens tables, the early-stop rates against each evaluation's
    manifest, and their place in the summary (cost per kept token) and the paired comparisons."""
    runs = select_runs(root, ["exp-*"])
    data = collect(root, runs)
    store = ArtifactStore(root)
    for m in METHODS:
        want_gen, want_kept = [], []
        for s in SEEDS:
            lin = RunLineage(root, f"exp-{m}-s{s}")
            gen = sum(len(t) for t in store.read_table(lin.get(0, "rollout").ref, "rollouts").column(
                "token_ids").to_pylist())
            want_gen.append(gen)
            if m == "topd":
                w = store.read_table(lin.get(0, "analyze").ref, "tokens").column("weight").to_pylist()
                want_kept.append(sum(1 for x in w if x > 0))
            else:
                want_kept.append(gen)
        row = next(k for k in data["kept"] if k["method"] == m and k["iteration"] == 0)
        assert row["generated"] == pytest.approx(statistics.mean(want_gen))
        assert row["kept"] == pytest.approx(statistics.mean(want_kept))
    stops = {(e["run"], e["step"]): e["rate"] for e in data["early_stops"]}
    for r in runs:
        for e in RunLineage(root, r.run).entries():
            if e.stage in ("baseline", "evaluate"):
                step = 0 if e.stage == "baseline" else e.iteration + 1
                assert stops[(r.run, step)] == store.manifest(e.ref)["meta"]["early_stop_rate"]
    s = summarize(runs, data)
    for m in METHODS:
        ms = s["methods"][m]
        assert ms["seconds_per_kept_token"] == pytest.approx(ms["seconds_per_iteration"]
                                                             / ms["kept_tokens_per_iteration"])
        assert set(ms["early_stop_by_seed"]) == {"0", "1"}
    [c] = s["comparisons"]
    assert c["early_stop"]["seeds"] == [0, 1] and "mean_diff" in c["early_stop"]


def test_fork_query_matches_a_python_count(root: Path) -> None:
    """report_sql/forks.sql against a direct computation over the topd runs' tokens tables: the examined fork
    tokens, the AUC of a fork's D_t against a form/filler token's, the share of forks called divergent."""
    from opd_tasks.topd.signals import TRUE_REGIME

    runs = select_runs(root, ["exp-topd-*"])
    rows = collect(root, runs)["forks"]
    store = ArtifactStore(root)
    toks = [t for r in runs for e in RunLineage(root, r.run).entries() if e.stage == "analyze"
            for t in store.read_table(e.ref, "tokens").to_pylist() if t["regime"] in ("surface", "divergent")]
    forks = [t for t in toks if t["role"] == "fork"]
    assert forks, "the fixture's runs (the consequential condition) should examine some premature stops"
    surface = [t["near_future_div"] for t in toks if TRUE_REGIME.get(t["role"]) == "surface"]
    auc = sum((f["near_future_div"] > d) + 0.5 * (f["near_future_div"] == d) for f in forks for d in surface) / (
        len(forks) * len(surface))
    [row] = rows
    assert row["forks"] == len(forks) and row["fork_auc"] == pytest.approx(auc)
    assert row["fork_recall"] == pytest.approx(sum(f["regime"] == "divergent" for f in forks) / len(forks))


def test_costs_after_a_fully_cached_rerun_are_what_computing_cost(root: Path, tmp_path: Path) -> None:
    """A rerun of every run (all cache hits; in a copy of the root, which works as it is) leaves each stage's cost
    what the first runs measured, not the hits' fraction of a second."""
    import shutil

    from opd_tasks.config import RunConfig
    from opd_tasks.pipeline import run_plain

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    runs = select_runs(copy, ["exp-*"])
    before = {(c["method"], c["stage"]): c["seconds"] for c in collect(copy, runs)["costs"]}
    for r in runs:
        cfg = RunConfig.model_validate(RunLineage(copy, r.run).info()["config"])
        out = run_plain(cfg.model_copy(update={"root": str(copy)}), log=lambda _m: None, progress=False)
        assert all(s.cached for it in out.iterations for s in it.stages.values())
    after = {(c["method"], c["stage"]): c["seconds"] for c in collect(copy, runs)["costs"]}
    assert after == pytest.approx(before) and min(after.values()) > 0  # the first runs' computing costs
