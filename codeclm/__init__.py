"""codeclm: plain Llama models that write images and videos as codec file bytes."""
