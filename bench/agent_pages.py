"""The agent evaluation's own web pages: a product list and an order form, served on the
host where sandboxes may reach them (BERTH_SANDBOX_HOST_PORTS). Orders submitted are kept,
and listed at /orders.json for the graders."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

from bench.agent_tasks import PRODUCTS

PRODUCTS_PAGE = (
    "<!doctype html><html><head><title>Products</title></head><body><h1>Products</h1>"
    "<table id='products'><tr><th>Name</th><th>Price</th></tr>"
    + "".join(f"<tr><td>{name}</td><td>{price}</td></tr>" for name, price in PRODUCTS)
    + "</table></body></html>"
)
ORDER_PAGE = (
    "<!doctype html><html><head><title>Order</title></head><body><h1>Order</h1>"
    "<form method='post' action='/order'>"
    "<label>Name <input name='name' id='name'></label>"
    "<label>Email <input name='email' id='email'></label>"
    "<label>Product <select name='product' id='product'>"
    + "".join(f"<option>{name}</option>" for name, _ in PRODUCTS)
    + "</select></label>"
    "<label>Quantity <input name='quantity' id='quantity' type='number'></label>"
    "<button type='submit' id='submit'>Place order</button></form></body></html>"
)


class Pages(ThreadingHTTPServer):
    def __init__(self, host: str, port: int) -> None:
        self.orders: list[dict[str, str]] = []
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: Pages

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        pages = {
            "/products.html": ("text/html", PRODUCTS_PAGE),
            "/order.html": ("text/html", ORDER_PAGE),
            "/orders.json": ("application/json", json.dumps(self.server.orders)),
        }
        kind, body = pages.get(self.path, ("text/plain", ""))
        self.send(200 if body else 404, kind, body or "not found")

    def do_POST(self) -> None:
        if self.path != "/order":
            return self.send(404, "text/plain", "not found")
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        order = dict(parse_qsl(raw))
        if self.headers.get("Content-Type", "").startswith("application/json"):
            order = {k: str(v) for k, v in json.loads(raw or "{}").items()}
        self.server.orders.append(order)
        self.send(200, "text/html", "<html><title>Thanks</title><body>Order placed</body></html>")

    def send(self, status: int, kind: str, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def serve(host: str, port: int) -> Iterator[Pages]:
    pages = Pages(host, port)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    try:
        yield pages
    finally:
        pages.shutdown()
        pages.server_close()
