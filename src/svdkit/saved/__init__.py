"""The saved format (format.py), writing and reading folders (folder.py), and the latent KV cache a
loaded model can run with (kvcache.py)."""
