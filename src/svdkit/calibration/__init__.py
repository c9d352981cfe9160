"""Calibration: statistics of every target's inputs (or gradients), one decoder layer at a time.

walk.py is the one layer-by-layer walk (inputs of layer 0 captured, then each layer run on the device
alone); collect.py hooks the target linears on it; gradients.py backpropagates through it (FWSVD's Fisher
information); statistics.py holds the accumulators; store.py spills finished statistics to disk.
"""
