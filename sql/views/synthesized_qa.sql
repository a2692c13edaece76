-- synthesized_qa: new QA pairs (partitions: discipline x grade)
SELECT * FROM read_parquet('{root}/synthesized_qa/*/*/part-*.parquet', hive_partitioning = false, union_by_name = true)
