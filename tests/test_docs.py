"""The runnable examples of the core's documentation run as written (a doc example that no longer
runs is a bug a user finds first)."""
import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), re.S)


@pytest.mark.parametrize("name, index", [("dynamic.md", 0), ("quant_conv.md", 1), ("quant_conv.md", 2),
                                         ("earlybird.md", 0)])
def test_doc_example_runs(name, index):
    from pyeff.dynamic import unregister_block

    code = _blocks(name)[index]
    scope: dict = {}
    torch.manual_seed(0)
    try:
        exec(compile(code, f"docs/{name} example {index}", "exec"), scope)  # noqa: S102 (our own docs)
    finally:
        if "MyBlock" in scope:
            unregister_block(scope["MyBlock"])
    if name == "dynamic.md":
        assert scope["logits"].shape == (2, 10) and len(scope["net"].blocks) == 3
    if name == "earlybird.md":
        assert len(scope["eb"].history) == 6 and sum(p.numel() for p in scope["small"].parameters()) < sum(
            p.numel() for p in scope["model"].parameters())
    if (name, index) == ("quant_conv.md", 2):
        assert scope["calls"][-1]["route"] in ("direct", "sliced", "gemm", "depthwise", "float")
