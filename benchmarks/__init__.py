"""The sections bench.py times, and what they share (timing.py); the CUDA ones in cuda.py."""
