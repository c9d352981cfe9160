"""The building blocks every stage shares: the low-rank layer, rank arithmetic, finding the decoder
layers, the device, option checks, the one registry type, and what differs between transformers releases."""
