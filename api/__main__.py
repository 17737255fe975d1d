"""``python -m api``: serve the API and dashboard."""

import uvicorn

from api.app import create_app
from berth.settings import get_settings


def main() -> None:
    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
