-- deficiency_probe: the target model's accuracy per discipline x grade cell, with a Wilson interval (unpartitioned)
SELECT * FROM read_parquet('{root}/deficiency_probe/part-*.parquet', hive_partitioning = false, union_by_name = true)
