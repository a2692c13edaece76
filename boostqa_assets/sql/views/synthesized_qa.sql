-- synthesized_qa: new QA pairs (partitions: discipline x grade)
SELECT * FROM read_parquet({files}, hive_partitioning = false, union_by_name = true)
