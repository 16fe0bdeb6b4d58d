"""TEM generators (abTEM/ASE imported lazily inside the modules that need them)."""
