"""Benchmarks of lowrank against its peers (PEFT, bitsandbytes), and the step they share.

Modules here import neither jax nor torch at import time: the same files run in lowrank's
environment and in the peers' reference one.
"""
