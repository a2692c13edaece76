-- One row per mixture document with its seed and every LLM request that shaped it.
CREATE OR REPLACE VIEW lineage AS
SELECT m.doc_id, m.recipe, m.qa_id, m.seed_id, s.source, s.native_id, s.kind AS seed_kind,
       a.discipline AS seed_discipline, a.grade AS seed_grade, a.difficulty AS seed_difficulty,
       a.annotate_model, a.annotate_prompt_id, a.annotate_prompt_version, a.annotate_request_hash,
       r.track, r.grade AS target_grade, r.synth_model, r.synth_prompt_id, r.synth_prompt_version,
       r.synth_request_hash, r.refine_model, r.refine_prompt_id, r.refine_prompt_version, r.refine_request_hash,
       coalesce(s.question, s.text) AS seed_content, r.question, r.answer AS draft_answer, r.refined_answer
FROM qa_mixture m
JOIN refined_qa r USING (qa_id)
JOIN seeds s ON s.seed_id = m.seed_id
LEFT JOIN annotated_seeds a ON a.seed_id = m.seed_id;
