"""Ray job entrypoints: parse the command line (and YAML), build one config, call one library function."""
