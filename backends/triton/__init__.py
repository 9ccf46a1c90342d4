"""The Triton backend's package: for now its kernels (blade.backends.triton.kernels); the graph backend comes later."""
