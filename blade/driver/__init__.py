"""The driver floor: the compile pipeline's stages — numerics options, accuracy guard, bisection, backend selection."""
