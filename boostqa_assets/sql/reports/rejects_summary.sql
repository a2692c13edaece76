-- Drop reasons per stage and partition.
CREATE OR REPLACE VIEW rejects_summary AS
SELECT stage, partition, reason, count(*) AS rows
FROM rejects
GROUP BY ALL
ORDER BY stage, partition, rows DESC;
