"""The Flax Llama-2 and its sharding rules."""
