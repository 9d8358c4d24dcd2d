"""Diagnostics: benchmarks (bench step / eval / sweep), the memory plan and its check against a
measured step, and the GPU check. None of them is needed to run a job."""
