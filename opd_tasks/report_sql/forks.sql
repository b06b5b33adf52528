-- The detector against the testbed's premature stops (role `fork`, the consequential condition), per method, over
-- the examined high-loss tokens (regime surface or divergent): how many are forks, the AUC of a fork's D_t against
-- a surface-form token's (form, filler: role_regime), and the share of forks called `divergent`.
WITH t AS (
  SELECT i.method, t.near_future_div AS d, t.role, t.regime, r.regime AS truth
  FROM tokens t JOIN run_info i USING (run) LEFT JOIN role_regime r ON r.role = t.role
  WHERE t.regime IN ('surface', 'divergent')
)
SELECT k.method, count(*) AS forks,
       (SELECT avg(CASE WHEN k2.d > f.d THEN 1.0 WHEN k2.d = f.d THEN 0.5 ELSE 0.0 END)
        FROM t k2, t f WHERE k2.method = k.method AND k2.role = 'fork' AND f.method = k.method
          AND f.truth = 'surface') AS fork_auc,
       avg((k.regime = 'divergent')::INTEGER) AS fork_recall
FROM t k
WHERE k.role = 'fork'
GROUP BY k.method
ORDER BY k.method
