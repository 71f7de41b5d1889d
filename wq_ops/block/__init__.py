"""One decoder block from its inputs to its quantized tensors and a typed record: no Ray, no threads, no
device tricks. This is where a reader learns how wq quantizes a block.

- `quantized.quantize_block_`: quantized propagation (GPTQ's scheme), a group of linears or a stage at a
  time, as the method's `Processor` says (`processors.PROCESSORS`, one table).
- `calibration`: float propagation, statistics a micro-batch at a time, then `solve_block_`.
- `records`: the per-layer records, their numbers read from the device in one copy by the caller.
- `clock`: how a phase is timed; the caller may hand in a device clock (`wq_ops.device`).
"""
