"""Workers: the model, the engine (scheduler, paged KV, continuous batching) and the worker service."""
