-- The regime classifier against the testbed's ground-truth token roles, per method and iteration (pooled over
-- seeds), over classified high-loss tokens (regime surface or divergent, role known): precision and recall of
-- `surface` against `form` tokens and of `divergent` against `reasoning`/`answer` tokens. The same
-- definition as opd_tasks.topd.signals.classifier_scores (written to each analysis artifact's manifest).
SELECT i.method, t.iteration,
       count(*) AS classified,
       count(*) FILTER (t.regime = 'surface' AND t.role = 'form')
         / nullif(count(*) FILTER (t.regime = 'surface'), 0) AS surface_precision,
       count(*) FILTER (t.regime = 'surface' AND t.role = 'form')
         / nullif(count(*) FILTER (t.role = 'form'), 0) AS surface_recall,
       count(*) FILTER (t.regime = 'divergent' AND t.role IN ('reasoning', 'answer'))
         / nullif(count(*) FILTER (t.regime = 'divergent'), 0) AS divergent_precision,
       count(*) FILTER (t.regime = 'divergent' AND t.role IN ('reasoning', 'answer'))
         / nullif(count(*) FILTER (t.role IN ('reasoning', 'answer')), 0) AS divergent_recall
FROM tokens t JOIN run_info i USING (run)
WHERE t.regime IN ('surface', 'divergent') AND t.role IS NOT NULL
GROUP BY ALL
ORDER BY i.method, t.iteration
