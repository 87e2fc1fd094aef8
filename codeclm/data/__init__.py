"""Data: sources -> ArrayRecord byte shards -> Grain batches."""
