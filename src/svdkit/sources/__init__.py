"""What svdkit reads: models (folders, hub ids, .gguf files, the bundled SmolLM2) and text (files, named
datasets, calibration and evaluation windows)."""
