"""Tools: the doctor, the demo and the benchmarks."""
