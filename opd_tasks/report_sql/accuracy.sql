-- Test accuracy of each run after each iteration. step 0 is the baseline (the initial student, before any
-- update); step i+1 is the checkpoint made by iteration i. run_info(run, method, seed) comes from run lineage.
-- rkl_per_token: the reverse KL of the student's answers to the teacher (with its context), teacher-forced, in
-- nats per answer token; truncated: the share of answers that hit evaluation.max_new_tokens.
SELECT e.run, i.method, i.seed,
       CASE WHEN e.stage = 'baseline' THEN 0 ELSE e.iteration + 1 END AS step,
       avg(e.correct::INTEGER) AS accuracy,
       sum(e.rkl) / nullif(sum(e.num_tokens), 0) AS rkl_per_token,
       avg(e.truncated::INTEGER) AS truncated,
       count(*) AS samples
FROM evals e JOIN run_info i USING (run)
WHERE e.stage IN ('baseline', 'evaluate')
GROUP BY ALL
ORDER BY i.method, i.seed, step
