"""A saved image retargeted to another domain (sandboxes/snapshots.py): its header names the
new domain, its cookie and memory stream are the snapshot's, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxes.snapshots import SAVE_HEADER, SAVE_MAGIC, SnapshotError, retarget


def saved_image(path: Path, xml: bytes, cookie: bytes, stream: bytes) -> None:
    data = xml + b"\0" + cookie + b"\0" + b"\0" * 100  # libvirt pads the data
    header = SAVE_HEADER.pack(SAVE_MAGIC, 2, len(data), 1, 0, len(xml) + 1)
    path.write_bytes(header + data + stream)


def read(path: Path) -> tuple[tuple[object, ...], bytes, bytes, bytes]:
    raw = path.read_bytes()
    fields = SAVE_HEADER.unpack(raw[: SAVE_HEADER.size])
    length, cookie_at = fields[2], fields[5]
    data = raw[SAVE_HEADER.size : SAVE_HEADER.size + length]
    assert isinstance(cookie_at, int)
    xml = data[:cookie_at].split(b"\0")[0]
    cookie = data[cookie_at:].split(b"\0")[0]
    return fields, xml, cookie, raw[SAVE_HEADER.size + length :]


def test_a_retargeted_image_names_the_new_domain_over_the_same_memory(tmp_path: Path) -> None:
    stream = bytes(range(256)) * 5000
    saved_image(
        tmp_path / "memory.save", b"<domain><name>old</name></domain>", b"<cookie/>", stream
    )
    new_xml = "<domain><name>berth-new</name><uuid>u</uuid>" + "x" * 5000 + "</domain>"
    retarget(tmp_path / "memory.save", tmp_path / "copy.save", new_xml)
    fields, xml, cookie, rest = read(tmp_path / "copy.save")
    assert fields[0] == SAVE_MAGIC and fields[1] == 2 and fields[3] == 1 and fields[4] == 0
    assert (xml, cookie) == (new_xml.encode(), b"<cookie/>")
    assert rest == stream


def test_only_uncompressed_libvirt_images_are_retargeted(tmp_path: Path) -> None:
    (tmp_path / "other").write_bytes(b"QEVM" + b"\0" * 200)
    with pytest.raises(SnapshotError):
        retarget(tmp_path / "other", tmp_path / "copy.save", "<domain/>")
