-- The regime classifier against the testbed's ground-truth token roles, per method and iteration (pooled over
-- seeds), over classified high-loss tokens (regime surface or divergent, role known): precision and recall of
-- each regime against the regime the role should get (role_regime: opd_tasks.topd.signals.TRUE_REGIME, form and
-- filler -> surface; reasoning, answer, fork -> divergent). The same definition as
-- opd_tasks.topd.signals.classifier_scores (written to each analysis artifact's manifest).
SELECT i.method, t.iteration,
       count(*) AS classified,
       count(*) FILTER (t.regime = 'surface' AND r.regime = 'surface')
         / nullif(count(*) FILTER (t.regime = 'surface'), 0) AS surface_precision,
       count(*) FILTER (t.regime = 'surface' AND r.regime = 'surface')
         / nullif(count(*) FILTER (r.regime = 'surface'), 0) AS surface_recall,
       count(*) FILTER (t.regime = 'divergent' AND r.regime = 'divergent')
         / nullif(count(*) FILTER (t.regime = 'divergent'), 0) AS divergent_precision,
       count(*) FILTER (t.regime = 'divergent' AND r.regime = 'divergent')
         / nullif(count(*) FILTER (r.regime = 'divergent'), 0) AS divergent_recall
FROM tokens t JOIN run_info i USING (run) LEFT JOIN role_regime r ON r.role = t.role
WHERE t.regime IN ('surface', 'divergent') AND t.role IS NOT NULL
GROUP BY ALL
ORDER BY i.method, t.iteration
