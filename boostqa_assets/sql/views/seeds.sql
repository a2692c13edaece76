-- seeds: one row per normalized seed (partition: source)
SELECT * FROM read_parquet({files}, hive_partitioning = false, union_by_name = true)
