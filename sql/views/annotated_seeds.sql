-- annotated_seeds: seeds with discipline, category, grade, difficulty (partition: source)
SELECT * FROM read_parquet('{root}/annotated_seeds/*/part-*.parquet', hive_partitioning = false, union_by_name = true)
