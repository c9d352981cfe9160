"""Calibration: statistics of every target's inputs (or gradients), one decoder layer at a time on the
layer engine (:mod:`svdkit.engine`).

collect.py hooks the target linears as the engine walks the layers; gradients.py backpropagates layer by
layer (FWSVD's Fisher information); statistics.py holds the accumulators; store.py spills finished
statistics to disk.
"""
