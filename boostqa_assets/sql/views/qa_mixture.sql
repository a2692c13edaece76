-- qa_mixture: training documents (partition: recipe), the Parquet shards listed in each manifest.json
SELECT * FROM read_parquet({files}, hive_partitioning = false, union_by_name = true)
