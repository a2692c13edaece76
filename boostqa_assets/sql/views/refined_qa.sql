-- refined_qa: kept QA with refined answers and flags (partitions: discipline x grade)
SELECT * FROM read_parquet({files}, hive_partitioning = false, union_by_name = true)
