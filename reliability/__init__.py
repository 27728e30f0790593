"""Fault scenarios and load scripts for Sealer's job service.

`python -m reliability.run` runs the long scenarios and the load scripts (`make
reliability`); tests/test_faults.py runs short versions of the same scenarios. Every
server and process they start listens on 127.0.0.1 and is stopped before they return.
"""
