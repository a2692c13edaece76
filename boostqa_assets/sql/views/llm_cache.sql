-- llm_cache: one row per cached LLM response, keyed by the request hash stored on every row's lineage columns
-- The cache (boostqa_assets/llm/cache/) keeps replies in Parquet segments and compacted shards; older caches hold
-- one JSON file per reply. inspect.py puts the parts below whose files exist in place of {parts} (UNION ALL: every
-- part lists the same columns in the same order). A hash stored twice (two writers, a compaction under way) is one
-- row: the earliest, as the cache returns (JSON files, with no time, last; not NULLS LAST: DuckDB 2.0 rewrites this
-- into arg_min_nulls_last, which picked the NULL row in most runs).
SELECT * EXCLUDE (_copy) FROM (
    SELECT *, row_number() OVER (PARTITION BY request_hash ORDER BY coalesce(created_at, 'infinity'::TIMESTAMPTZ)) AS _copy
    FROM ({parts})
) WHERE _copy = 1
-- part: segments
SELECT request_hash, role, model, CAST(request AS JSON) AS request, content, reasoning, finish_reason, tokens_in, tokens_out, latency_s, created_at FROM read_parquet('{root}/_llm_cache/segments/*.parquet', hive_partitioning = false)
-- part: shards
SELECT request_hash, role, model, CAST(request AS JSON) AS request, content, reasoning, finish_reason, tokens_in, tokens_out, latency_s, created_at FROM read_parquet('{root}/_llm_cache/shards/*/*.parquet', hive_partitioning = false)
-- part: legacy
SELECT request_hash, role, model, request, content, reasoning, finish_reason, tokens_in, tokens_out, latency_s, CAST(NULL AS TIMESTAMPTZ) AS created_at FROM read_json('{root}/_llm_cache/??/*.json', format = 'auto', columns = {request_hash: 'VARCHAR', role: 'VARCHAR', model: 'VARCHAR', request: 'JSON', content: 'VARCHAR', reasoning: 'VARCHAR', finish_reason: 'VARCHAR', tokens_in: 'BIGINT', tokens_out: 'BIGINT', latency_s: 'DOUBLE'})
