"""The tools floor: the command line, serving exports, verification and profiling of artifacts."""
