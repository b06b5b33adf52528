-- Wall seconds of each stage per method: the median over the stage runs of these runs. A cache hit is charged
-- what computing its artifact cost (the computed lineage entry with the same sha256, in any selected run), so a
-- rollout shared by two methods costs both the same; a hit whose computing run is not selected keeps its own
-- (small) seconds. The eval prompts and the baseline are one-off and left out.
WITH computed AS (
  SELECT sha256, median(seconds) AS seconds
  FROM lineage
  WHERE NOT coalesce(cached, false) AND seconds IS NOT NULL
  GROUP BY sha256
)
SELECT i.method, l.stage,
       median(coalesce(c.seconds, l.seconds)) AS seconds,
       count(*) AS stage_runs
FROM lineage l
JOIN run_info i USING (run)
LEFT JOIN computed c USING (sha256)
WHERE l.stage NOT IN ('baseline', 'eval_prompts') AND coalesce(c.seconds, l.seconds) IS NOT NULL
GROUP BY ALL
ORDER BY i.method, l.stage
