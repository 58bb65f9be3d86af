"""``make demo``: train the reference MoE transformer with a pipeline schedule on local CPU processes and
show where the time went (measured vs simulated bubble, timeline, Chrome trace, loss curve)."""
