"""Test and benchmark builders: tiny random-weight teachers in the real diffusers layouts.

Not used by training; tests, benchmarks and `carv3d variance --random-teacher`-style tools build
their teachers here (diffusers' habit: tiny random models make fast CPU tests of real pipelines).
"""
