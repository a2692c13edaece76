-- deficiency_probe_items: every probe question, the target model's reply, how it was graded, and the request hashes
SELECT * FROM read_parquet({files}, hive_partitioning = false, union_by_name = true)
