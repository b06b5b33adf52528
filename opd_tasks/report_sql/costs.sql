-- Wall seconds of each stage per method: the median over the stage runs of these runs. A cache hit is charged
-- what computing its artifact cost (`compute_seconds`: kept in a run's own pointer across cached reruns, and taken
-- from any selected run that computed the same sha256), so a rollout shared by two methods costs both the same
-- and a fully cached rerun costs what the first run did; a hit whose computation no selected run recorded keeps
-- its own (small) seconds. The eval prompts, the baseline and the teacher's evaluation (the headroom gate) are
-- one-off and left out.
WITH computed AS (
  SELECT sha256, median(compute_seconds) AS seconds
  FROM lineage
  WHERE compute_seconds IS NOT NULL
  GROUP BY sha256
)
SELECT i.method, l.stage,
       median(coalesce(c.seconds, l.seconds)) AS seconds,
       count(*) AS stage_runs
FROM lineage l
JOIN run_info i USING (run)
LEFT JOIN computed c USING (sha256)
WHERE l.stage NOT IN ('baseline', 'eval_prompts', 'teacher_eval') AND coalesce(c.seconds, l.seconds) IS NOT NULL
GROUP BY ALL
ORDER BY i.method, l.stage
