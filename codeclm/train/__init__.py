"""Training: the loop, optimizer, checkpoints, preemption, MFU and the
ahead-of-time compile report."""
