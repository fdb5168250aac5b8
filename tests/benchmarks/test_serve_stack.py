"""benchmarks/serve_stack.py: every stack answers the benchmark route (so the comparison is of working apps)."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="pip install 'huse-edge[serve]'")
pytest.importorskip("fastapi", reason="pip install 'huse-edge[bench]'")


@pytest.mark.parametrize("stack", ["starlette", "fastapi", "fastapi-pydantic"])
def test_each_stack_serves_the_route(stack):
    from huse.benchmarks.serve_stack import asgi_overhead_us

    assert asgi_overhead_us(stack, 3) > 0  # it asserts a 200 on every call
