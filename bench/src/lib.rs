//! Helpers shared by hetmem's benchmarks.
