-- rejects: every row a stage could not keep, with stage, partition and reason
SELECT * FROM read_parquet({files}, hive_partitioning = false, union_by_name = true)
