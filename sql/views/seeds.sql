-- seeds: one row per normalized seed (partition: source)
SELECT * FROM read_parquet('{root}/seeds/*/part-*.parquet', hive_partitioning = false, union_by_name = true)
