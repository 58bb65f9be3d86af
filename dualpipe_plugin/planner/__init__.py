"""The planner's measuring side: profile a model on this process and the pipeline group's link.

torch lives here (the pure planning is in :mod:`dualpipe_plugin.schedules`: the cost file, the stage
cost and memory models, the cut search, the plan). ``dualpipe-plugin profile`` and
:func:`profile_model` write one cost file that ``dualpipe-plugin advise --profile`` reads.
"""
