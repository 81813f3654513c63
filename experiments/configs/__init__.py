"""Experiment configs: one ``get_config()`` per file (ml_collections).

Launch with ``python -m experiments.train --config=experiments/configs/<name>.py``;
each docstring gives the command, the hardware and the result reached.
"""
