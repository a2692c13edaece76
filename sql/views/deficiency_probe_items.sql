-- deficiency_probe_items: every probe question, the target model's reply, how it was graded, and the request hashes
SELECT * FROM read_parquet('{root}/deficiency_probe_items/part-*.parquet', hive_partitioning = false, union_by_name = true)
