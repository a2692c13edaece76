-- deficiency_probe: the target model's accuracy per discipline x grade cell, with a Wilson interval (unpartitioned)
SELECT * FROM read_parquet({files}, hive_partitioning = false, union_by_name = true)
