-- Wall seconds of each stage per method: the median over the stage runs that were computed (cache hits
-- excluded, so a rollout shared by two methods counts once, for the method that computed it). The eval
-- prompts and the baseline are one-off and left out.
SELECT i.method, l.stage,
       median(l.seconds) AS seconds,
       count(*) AS computed
FROM lineage l JOIN run_info i USING (run)
WHERE NOT coalesce(l.cached, false) AND l.seconds IS NOT NULL
  AND l.stage NOT IN ('baseline', 'eval_prompts')
GROUP BY ALL
ORDER BY i.method, l.stage
