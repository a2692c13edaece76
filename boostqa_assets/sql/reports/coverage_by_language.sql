-- Coverage per language: QA rows synthesized, kept and sampled, and mixture tokens, per discipline x grade x
-- language (the QA's language), one row per populated combination. `coverage` has the discipline x grade cells.
CREATE OR REPLACE VIEW coverage_by_language AS
WITH synthesized AS (
    SELECT discipline, grade, language, count(*) AS synthesized_rows FROM synthesized_qa GROUP BY ALL
), refined AS (
    SELECT discipline, grade, language, count(*) AS refined_rows FROM refined_qa GROUP BY ALL
), mixture AS (
    SELECT discipline, grade, language, count(*) AS mixture_docs, CAST(sum(n_tokens) AS BIGINT) AS mixture_tokens
    FROM qa_mixture GROUP BY ALL
)
SELECT discipline, grade, language,
       coalesce(s.synthesized_rows, 0) AS synthesized_rows,
       coalesce(r.refined_rows, 0) AS refined_rows,
       coalesce(m.mixture_docs, 0) AS mixture_docs,
       coalesce(m.mixture_tokens, 0) AS mixture_tokens
FROM synthesized s
    FULL OUTER JOIN refined r USING (discipline, grade, language)
    FULL OUTER JOIN mixture m USING (discipline, grade, language)
ORDER BY discipline, grade, language;
