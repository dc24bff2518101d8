"""Talk to a started kernel the way a notebook does: wait for it, run code, read values back."""

from __future__ import annotations

import ast

from jupyter_client.manager import AsyncKernelManager


async def evaluate(km: AsyncKernelManager, code: str, expressions: dict[str, str] | None = None) -> dict[str, object]:
    """Wait for the kernel, execute ``code``, return ``expressions`` evaluated there as Python values."""
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        reply = await client.execute(code, user_expressions=expressions or {}, reply=True, timeout=60)
    finally:
        client.stop_channels()
    content = reply["content"]
    assert content["status"] == "ok", content
    return {k: ast.literal_eval(v["data"]["text/plain"]) for k, v in content["user_expressions"].items()}
