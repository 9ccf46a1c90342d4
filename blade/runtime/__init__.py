"""The runtime floor: the compiled model, shape guards, artifacts, the compile cache and its fingerprints."""
