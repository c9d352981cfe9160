"""The saved format (format.py), writing folders (folder.py) with their model card (card.py), and the latent
KV cache a loaded model can run with (kvcache.py); reading a folder back is :mod:`svdkit.sources`'."""
