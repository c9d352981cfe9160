"""The compression pipeline: a plan made once (plan.py), then named stages (stages.py): calibrate,
allocate, factor, train, heal, record; compress.py runs them. update.py is the least-squares refit of B."""
