"""Model structure, read from the model class itself: which tensors form each decoder block, which of
them are linear layers, and a functional forward over one block's tensors.

`architecture.describe_model` runs on the driver (meta device, no weights); `block.DecoderBlock` runs on
actors. No per-architecture tables: the class instantiated on the meta device is the source of truth.
That class is transformers' own, or for Llama, Qwen2 and Qwen3 configs `native_llama`'s modules, which compute the
same bits without transformers' import on the job's critical path.
"""
