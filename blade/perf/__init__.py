"""The measurement floor: cost model, machine peaks, timing, accuracy metrics, the compile report, rooflines."""
