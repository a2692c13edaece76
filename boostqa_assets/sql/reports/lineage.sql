-- lineage_qa: one row per kept QA pair with its seed and every LLM request that shaped it.
CREATE OR REPLACE VIEW lineage_qa AS
SELECT r.qa_id, r.seed_id, s.source, s.native_id, s.kind AS seed_kind, s.license,
       r.discipline, r.grade, r.track, a.grade AS seed_grade, a.difficulty AS seed_difficulty,
       a.annotate_model, a.annotate_prompt_id, a.annotate_prompt_version, a.annotate_request_hash,
       r.synth_model, r.synth_prompt_id, r.synth_prompt_version, r.synth_request_hash,
       r.refine_model, r.refine_prompt_id, r.refine_prompt_version, r.refine_request_hash,
       coalesce(s.question, s.text) AS seed_content, r.question, r.answer AS draft_answer, r.reasoning,
       r.refined_answer
FROM refined_qa r
JOIN seeds s USING (seed_id)
LEFT JOIN annotated_seeds a USING (seed_id);

-- lineage: one row per mixture document, traced to its seed and LLM requests (one DuckDB query).
CREATE OR REPLACE VIEW lineage AS
SELECT m.doc_id, m.recipe, m.n_tokens, l.*
FROM qa_mixture m
JOIN lineage_qa l USING (qa_id);
