-- Test accuracy of each run after each iteration. step 0 is the baseline (the initial student, before any
-- update); step i+1 is the checkpoint made by iteration i. run_info(run, method, seed) comes from run lineage.
SELECT e.run, i.method, i.seed,
       CASE WHEN e.stage = 'baseline' THEN 0 ELSE e.iteration + 1 END AS step,
       avg(e.correct::INTEGER) AS accuracy,
       count(*) AS samples
FROM evals e JOIN run_info i USING (run)
WHERE e.stage IN ('baseline', 'evaluate')
GROUP BY ALL
ORDER BY i.method, i.seed, step
