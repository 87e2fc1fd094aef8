"""Training: the loop, optimizer, checkpoints, preemption, MFU and the
ahead-of-time compile report.

Checkpoints: checkpoint.py (the Orbax manager, resume), checkpoint_steps.py
(which steps are whole), data_position.py (the loader streams' positions),
params_io.py (parameters alone, for sampling, export and init_from). The
compile report: compile.py (the job), tpu_topology.py, hlo_stats.py,
compile_report.py.
"""
