-- One row per (kept QA, LLM step): the model, prompt version, request hash and the raw reply from the cache.
CREATE OR REPLACE VIEW lineage_steps AS
WITH steps AS (
    SELECT r.qa_id, r.seed_id, 1 AS step_no, 'annotate' AS step, a.annotate_model AS model,
           a.annotate_prompt_id AS prompt_id, a.annotate_prompt_version AS prompt_version,
           a.annotate_request_hash AS request_hash
    FROM refined_qa r JOIN annotated_seeds a USING (seed_id)
    UNION ALL
    SELECT qa_id, seed_id, 2, 'synthesize', synth_model, synth_prompt_id, synth_prompt_version, synth_request_hash
    FROM refined_qa
    UNION ALL
    SELECT qa_id, seed_id, 3, 'refine', refine_model, refine_prompt_id, refine_prompt_version, refine_request_hash
    FROM refined_qa
)
SELECT s.*, c.content AS raw_output, c.reasoning AS raw_reasoning, c.tokens_in, c.tokens_out
FROM steps s LEFT JOIN llm_cache c USING (request_hash)
ORDER BY qa_id, step_no;
