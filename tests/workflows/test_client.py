"""How to reach the workflows: the client refuses a namespace the server does not have, so no
process goes on to take every workflow for gone."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import Settings
from workflows.client import UnknownNamespace, connect


async def test_a_namespace_the_server_lacks_is_refused_by_name(
    temporal_address: str, tmp_path: Path
) -> None:
    known = Settings(data_dir=tmp_path, temporal_address=temporal_address)
    client = await connect(known)
    assert client.namespace == "default"
    typo = known.model_copy(update={"temporal_namespace": "berth-typo"})
    with pytest.raises(UnknownNamespace, match="no namespace 'berth-typo'"):
        await connect(typo)
