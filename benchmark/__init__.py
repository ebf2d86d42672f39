"""Threat Bus benchmarks: throughput, latency, fan-out and memory against the RabbitMQ/pika ceiling.

Run ``python -m benchmark.run --help`` from the repository root.
"""
