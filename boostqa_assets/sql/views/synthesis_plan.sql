-- synthesis_plan: QA budget per discipline x grade cell and why (probe accuracy, need, weights; partitions: discipline x grade)
SELECT * FROM read_parquet({files}, hive_partitioning = false, union_by_name = true)
