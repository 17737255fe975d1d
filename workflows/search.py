"""What an operator sees of a session in the Temporal Web UI without the payload codec:
four search attributes (whose user, its status, template and host: filter with
``BerthUser="<user id>"``), and a summary and details that name the session and its state.
All are plain (never encrypted) and carry ids and states only, no user content.

The attributes must be registered on the namespace before a workflow may carry them:
``make run`` starts its dev server with them (``dev_server_flags``); on a cluster of one's own
``python -m berth temporal-setup`` adds them (``register``). The API gives sessions the
attributes only once it has seen them registered, so an unprepared cluster runs sessions as
before, without them.
"""

from __future__ import annotations

from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.converter import DataConverter

USER = SearchAttributeKey.for_keyword("BerthUser")
STATUS = SearchAttributeKey.for_keyword("BerthStatus")
TEMPLATE = SearchAttributeKey.for_keyword("BerthTemplate")
HOST = SearchAttributeKey.for_keyword("BerthHost")
KEYS = (USER, STATUS, TEMPLATE, HOST)


def dev_server_flags() -> list[str]:
    """``temporal server start-dev`` arguments that register the attributes."""
    return [arg for key in KEYS for arg in ("--search-attribute", f"{key.name}=Keyword")]


async def missing(client: Client, namespace: str) -> list[str]:
    """The attributes the namespace does not have yet."""
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    have = set(listed.custom_attributes)
    return [key.name for key in KEYS if key.name not in have]


async def register(client: Client, namespace: str) -> list[str]:
    """Add the attributes the namespace lacks (idempotent); the names added."""
    names = await missing(client, namespace)
    if names:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=namespace,
                search_attributes=dict.fromkeys(names, IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD),
            )
        )
    return names


def at_start(user_id: str, template: str, host_id: str, status: str) -> TypedSearchAttributes:
    return TypedSearchAttributes(
        [
            SearchAttributePair(USER, user_id),
            SearchAttributePair(STATUS, status),
            SearchAttributePair(TEMPLATE, template),
            SearchAttributePair(HOST, host_id),
        ]
    )


def plain(text: str) -> Payload:
    """A summary's payload as is, past the encryption codec: the Web UI shows it to whoever
    may see the workflow list, so it holds ids and states only."""
    payload: Payload = DataConverter.default.payload_converter.to_payloads([text])[0]
    return payload


def summary(session_id: str, template: str, state: str) -> Payload:
    return plain(f"Berth session {session_id} ({template}), {state}")


def details(session_id: str, user_id: str, template: str, host_id: str) -> Payload:
    return plain(
        f"Session {session_id} of user {user_id}: template {template}, host {host_id}. "
        "Its status now is the search attribute BerthStatus; its tasks and commands are "
        "encrypted (the Web UI shows them through the API's codec, to an admin)."
    )
