"""The nightly scheduler: a watch list of Hub models and recipes (`watchlist`), the Hub as a source of
revisions and model cards (`hub`), a durable state file (`state`), Ray Jobs submission (`submit`), and one
run that ties them together (`nightly.run_nightly`). It submits quantize jobs; it never quantizes itself."""
