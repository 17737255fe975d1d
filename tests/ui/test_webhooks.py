"""The preferences page's webhooks: an endpoint added (its secret shown once), a refused URL
kept as typed with the reason, the delivery log, a new secret, removal; and the JSON API's
same rules."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlmodel import Session, select

from store.models import WebhookEndpoint
from tests.ui.test_dashboard import client, log_in
from tests.ui.test_tokens import actions, rows

__all__ = ["client"]  # the fixture

URL = "https://93.184.216.34/hooks/berth"


def secret_in(html: str) -> str:
    found = re.search(r'id="webhook-secret" class="secret" readonly value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def test_an_endpoint_is_added_shown_once_rotated_and_removed(client: TestClient) -> None:
    csrf = log_in(client)
    page = client.get("/preferences")
    assert page.status_code == 200 and "Webhooks" in page.text and "<tbody>" not in page.text
    made = client.post(
        "/ui/webhooks",
        data={"url": URL, "events": ["task.finished", "session.ended"]},
        headers=actions(csrf),
    )
    assert made.status_code == 200 and made.text.lstrip().startswith('<div id="webhooks">')
    secret = secret_in(made.text)
    assert secret.startswith("whsec_")
    assert rows(made.text) == [f"{URL} session.ended, task.finished Deliveries New secret Remove"]
    assert secret not in client.get("/preferences").text  # shown once
    with Session(client.app.state.engine) as db:  # type: ignore[attr-defined]
        (row,) = db.exec(select(WebhookEndpoint)).all()
        assert secret not in row.secret  # kept sealed
    log = client.get(f"/ui/webhooks/{row.id}/deliveries", headers=actions(csrf))
    assert log.status_code == 200 and "None yet." in log.text
    rotated = client.post(f"/ui/webhooks/{row.id}/rotate", headers=actions(csrf))
    assert "A new secret for" in rotated.text and secret_in(rotated.text) != secret
    removed = client.post(f"/ui/webhooks/{row.id}/delete", headers=actions(csrf))
    assert removed.status_code == 200 and "<tbody>" not in removed.text


def test_a_private_url_is_refused_and_kept_as_typed(client: TestClient) -> None:
    csrf = log_in(client)
    url = "http://169.254.169.254/latest/meta-data"
    refused = client.post(
        "/ui/webhooks", data={"url": url, "events": ["task.finished"]}, headers=actions(csrf)
    )
    assert refused.status_code == 422
    assert f'value="{url}"' in refused.text and "non-public address" in refused.text
    assert 'id="webhook-secret"' not in refused.text
    none = client.post("/ui/webhooks", data={"url": URL}, headers=actions(csrf))
    assert none.status_code == 422  # no event chosen


def test_the_json_api_shows_the_secret_once_and_refuses_what_the_page_refuses(
    client: TestClient,
) -> None:
    csrf = log_in(client)
    made_token = client.post("/ui/tokens", data={"name": "t"}, headers=actions(csrf)).text
    token = re.search(r'class="secret" readonly value="([^"]+)"', made_token)
    assert token
    api = {"Authorization": f"Bearer {token.group(1)}"}
    made = client.post("/api/webhooks", json={"url": URL, "events": ["sandbox.died"]}, headers=api)
    assert made.status_code == 201 and made.json()["secret"].startswith("whsec_")
    hook = made.json()["id"]
    assert client.get(f"/api/webhooks/{hook}", headers=api).json()["secret"] is None
    ftp = {"url": "ftp://x.example/h", "events": ["sandbox.died"]}
    wrong = client.post("/api/webhooks", json=ftp, headers=api)
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["loc"] == ["body", "url"]
    unknown = client.post("/api/webhooks", json={"url": URL, "events": ["task.started"]},
                          headers=api)  # fmt: skip
    assert unknown.status_code == 422
    paused = client.put(f"/api/webhooks/{hook}", headers=api,
                        json={"url": URL, "events": ["sandbox.died"], "active": False})  # fmt: skip
    assert paused.status_code == 200 and paused.json()["active"] is False
    assert client.get(f"/api/webhooks/{hook}/deliveries", headers=api).json() == []
    assert client.delete(f"/api/webhooks/{hook}", headers=api).status_code == 204
    assert client.get(f"/api/webhooks/{hook}", headers=api).status_code == 404
