"""Throughput and latency suite: raw-Kafka floor, the mediator, Celery, micro-benchmarks.

Run it with ``python -m benchmarks.run`` (``--help`` for the options); see README.md.
"""
