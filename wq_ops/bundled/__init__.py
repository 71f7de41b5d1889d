"""What wq runs on when given no model and no data: a tiny Llama-architecture checkpoint it writes
itself (seeded random weights, byte-level tokenizer) and a small public-domain text."""
