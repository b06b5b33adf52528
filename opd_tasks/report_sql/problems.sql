-- Per run, step and eval problem: the share of its samples that are correct (1 or 0 with one greedy sample).
-- step 0 is the baseline, step i+1 the checkpoint of iteration i (as in accuracy.sql). The paired comparisons
-- resample these problems (opd_tasks/stats.py, bootstrap_ci).
SELECT e.run,
       CASE WHEN e.stage = 'baseline' THEN 0 ELSE e.iteration + 1 END AS step,
       e.prompt_id,
       avg(e.correct::INTEGER) AS correct
FROM evals e JOIN run_info i USING (run)
WHERE e.stage IN ('baseline', 'evaluate')
GROUP BY ALL
ORDER BY e.run, step, e.prompt_id
