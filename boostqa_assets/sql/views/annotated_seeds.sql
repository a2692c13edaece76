-- annotated_seeds: seeds with discipline, category, grade, difficulty (partition: source)
SELECT * FROM read_parquet({files}, hive_partitioning = false, union_by_name = true)
