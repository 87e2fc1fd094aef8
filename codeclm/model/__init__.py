"""The Flax Llama-2: config, layers, KV cache, sharding rules, test weights."""
