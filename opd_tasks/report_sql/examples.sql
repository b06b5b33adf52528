-- Token examples: the $k rollouts of run $run at iteration $iteration with the most classified high-loss
-- tokens, every token in order, with the probe (teacher and student continuations) at probed positions and
-- the prompt's text.
WITH pick AS (
  SELECT run, iteration, prompt_id, sample_id,
         count(*) FILTER (regime IN ('surface', 'divergent')) AS classified
  FROM tokens
  WHERE run = $run AND iteration = $iteration
  GROUP BY ALL
  ORDER BY classified DESC, prompt_id, sample_id
  LIMIT $k
)
SELECT t.prompt_id, t.sample_id, t.pos, t.token_id, t.k1, t.high_loss, t.near_future_div, t.regime,
       t.weight, t.role, p.teacher_continuation, p.student_continuation, p.distance, q.prompt
FROM tokens t
JOIN pick USING (run, iteration, prompt_id, sample_id)
LEFT JOIN probes p
  ON p.run = t.run AND p.iteration = t.iteration AND p.prompt_id = t.prompt_id AND p.sample_id = t.sample_id
 AND p.pos = t.pos
LEFT JOIN (SELECT DISTINCT run, iteration, prompt_id, prompt FROM prompts WHERE stage = 'prompts') q
  ON q.run = t.run AND q.iteration = t.iteration AND q.prompt_id = t.prompt_id
ORDER BY pick.classified DESC, t.prompt_id, t.sample_id, t.pos
