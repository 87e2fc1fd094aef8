"""Run-time services every job uses: storage (local paths and object stores)
and multi-host start-up."""
