-- Share of high-loss tokens in each regime (surface, divergent, unprobed) per method and iteration, pooled
-- over the seeds (token counts are summed before dividing).
SELECT i.method, t.iteration, t.regime,
       count(*) AS tokens,
       count(*) / sum(count(*)) OVER (PARTITION BY i.method, t.iteration) AS share
FROM tokens t JOIN run_info i USING (run)
WHERE t.high_loss
GROUP BY i.method, t.iteration, t.regime
ORDER BY i.method, t.iteration, t.regime
