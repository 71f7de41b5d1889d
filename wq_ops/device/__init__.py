"""Making a GPU fast to start and busy: the warm-up, the CUDA context, the compute thread, and host/device
copies. Start-up speed lives here, apart from the algorithm (wq_ops/block), which does not import it."""
