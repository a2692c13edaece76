-- Discipline x grade coverage: one row per taxonomy cell (taxonomy_cells, 22 x 5 by default), empty cells as zero,
-- in the taxonomy's order; a cell with rows that the taxonomy no longer has comes last (category NULL).
-- plan_budget: the QA the synthesis plan asked for (summed over recipes); then rows made, kept and sampled.
CREATE OR REPLACE VIEW coverage AS
WITH plan AS (
    SELECT discipline, grade, CAST(sum(budget) AS BIGINT) AS plan_budget FROM synthesis_plan GROUP BY ALL
), synthesized AS (
    SELECT discipline, grade, count(*) AS synthesized_rows FROM synthesized_qa GROUP BY ALL
), refined AS (
    SELECT discipline, grade, count(*) AS refined_rows FROM refined_qa GROUP BY ALL
), mixture AS (
    SELECT discipline, grade, count(*) AS mixture_docs, CAST(sum(n_tokens) AS BIGINT) AS mixture_tokens FROM qa_mixture GROUP BY ALL
), mixture_languages AS (
    SELECT discipline, grade, string_agg(language || ': ' || tokens, ', ' ORDER BY language) AS mixture_tokens_by_language
    FROM (SELECT discipline, grade, language, CAST(sum(n_tokens) AS BIGINT) AS tokens FROM qa_mixture GROUP BY ALL)
    GROUP BY ALL
), cells AS (
    SELECT discipline, grade FROM taxonomy_cells
    UNION SELECT discipline, grade FROM synthesized
    UNION SELECT discipline, grade FROM refined
    UNION SELECT discipline, grade FROM mixture
)
SELECT c.discipline, t.category, c.grade,
       coalesce(p.plan_budget, 0) AS plan_budget,
       coalesce(s.synthesized_rows, 0) AS synthesized_rows,
       coalesce(r.refined_rows, 0) AS refined_rows,
       coalesce(m.mixture_docs, 0) AS mixture_docs,
       coalesce(m.mixture_tokens, 0) AS mixture_tokens,
       coalesce(ml.mixture_tokens_by_language, '') AS mixture_tokens_by_language  -- per language: coverage_by_language
FROM cells c
LEFT JOIN taxonomy_cells t USING (discipline, grade)
LEFT JOIN plan p USING (discipline, grade)
LEFT JOIN synthesized s USING (discipline, grade)
LEFT JOIN refined r USING (discipline, grade)
LEFT JOIN mixture m USING (discipline, grade)
LEFT JOIN mixture_languages ml USING (discipline, grade)
ORDER BY t.discipline_order NULLS LAST, c.discipline, t.grade_order NULLS LAST, c.grade;
