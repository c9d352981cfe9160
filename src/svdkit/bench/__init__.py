"""The same-protocol benchmark: the grid runner (grid.py), its markdown report (report.py) and every
PNG plot svdkit draws (plots.py)."""
