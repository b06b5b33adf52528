-- Tokens generated and tokens kept (trained with a weight above 0) per method and iteration, averaged over the
-- runs: a method without the analysis keeps every completion token; with it, the tokens table says which. The
-- cost per kept token is the method's seconds per iteration over its kept tokens (opd_tasks/report/compare.py).
WITH generated AS (
  SELECT r.run, r.iteration, sum(len(r.token_ids)) AS generated
  FROM rollouts r WHERE r.stage = 'rollout' GROUP BY ALL
), kept AS (
  SELECT t.run, t.iteration, count(*) FILTER (t.weight > 0) AS kept
  FROM tokens t GROUP BY ALL
)
SELECT i.method, g.iteration, avg(g.generated) AS generated, avg(coalesce(k.kept, g.generated)) AS kept
FROM generated g JOIN run_info i USING (run) LEFT JOIN kept k USING (run, iteration)
GROUP BY ALL
ORDER BY i.method, g.iteration
