-- Discipline x grade coverage: kept QA rows (and mixture documents) per cell, one row per cell.
CREATE OR REPLACE VIEW coverage AS
WITH refined AS (
    SELECT discipline, grade, count(*) AS refined_rows FROM refined_qa GROUP BY ALL
), mixture AS (
    SELECT discipline, grade, count(*) AS mixture_docs, sum(n_tokens) AS mixture_tokens FROM qa_mixture GROUP BY ALL
), synthesized AS (
    SELECT discipline, grade, count(*) AS synthesized_rows FROM synthesized_qa GROUP BY ALL
)
SELECT discipline, grade,
       coalesce(s.synthesized_rows, 0) AS synthesized_rows,
       coalesce(r.refined_rows, 0) AS refined_rows,
       coalesce(m.mixture_docs, 0) AS mixture_docs,
       coalesce(m.mixture_tokens, 0) AS mixture_tokens
FROM synthesized s FULL OUTER JOIN refined r USING (discipline, grade) FULL OUTER JOIN mixture m USING (discipline, grade)
ORDER BY discipline, grade;
