"""AWQ's searches: one fake-quantization of scaled weights per candidate (no copy per candidate), and
the per-group clip error for every clip ratio (no clipped weights at all)."""
