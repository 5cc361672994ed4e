"""Continuous batching: many requests over one paged KV cache, each generated as it would be
alone (engine.py). sequence.py is one request's state, scheduler.py picks each step's work."""

from .engine import Engine, EngineStats, RequestHandle

__all__ = ["Engine", "EngineStats", "RequestHandle"]
