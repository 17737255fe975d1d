"""What a step keeps of its output in the guest, for re-attachment: bounded in lines and in
characters, oldest first, the sequence numbers unbroken."""

from __future__ import annotations

from guest_agent import execution
from guest_agent.execution import Execution


async def test_kept_output_is_bounded_in_characters_as_well_as_lines(monkeypatch) -> None:
    """Security review: 20,000 pieces of 64 KiB (`head -c 1500000000 /dev/zero`) were kept
    whole, over a gigabyte in the root agent of a 512 MiB machine."""
    monkeypatch.setattr(execution, "MAX_KEPT_CHARS", 1000)
    step = Execution(exec_id="e", timeout_s=10)
    for _ in range(50):
        await step.append("stdout", "x" * 100)
    assert sum(len(line.text) for line in step.lines) <= 1000
    assert [line.seq for line in step.lines] == list(range(41, 51))
    assert [line.seq for line in step.lines_after(45)] == list(range(46, 51))
    await step.append("stdout", "y" * 5000)  # a piece past the bound alone is kept alone
    assert [line.text[0] for line in step.lines] == ["y"]


async def test_kept_output_is_bounded_in_lines(monkeypatch) -> None:
    monkeypatch.setattr(execution, "MAX_KEPT_LINES", 5)
    step = Execution(exec_id="e", timeout_s=10)
    for i in range(12):
        await step.append("stderr", f"{i}\n")
    assert step.output() == "7\n8\n9\n10\n11\n"
