"""Demo material built on the library, not part of it: `corpus` renders the built-in sound pool
(`finelap corpus`, `make demo`) with fluidsynth and espeak-ng. Nothing in the library imports it."""
