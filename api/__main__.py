"""``python -m api``: serve the API and dashboard."""

import uvicorn

from berth.web import create_app
from config.settings import get_settings


def main() -> None:
    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        # With a certificate, HTTPS only: the dashboard's cookies are then Secure, and HSTS
        # is sent (api/headers.py).
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
    )


if __name__ == "__main__":
    main()
