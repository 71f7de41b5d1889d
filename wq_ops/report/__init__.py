"""The job report written next to the artifact: `wq_report.json` (machine-readable: per-layer error,
damping, timings, outlier statistics, config, versions) and `wq_report.html` (one offline page)."""
