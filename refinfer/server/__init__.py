"""The OpenAI-compatible HTTP server over refinfer.Engine (`python -m refinfer serve`):
protocol.py is the requests' schema, app.py the routes, metrics.py /metrics, static/ the chat
page. Nothing below this package knows about HTTP."""

from .app import create_app

__all__ = ["create_app"]
