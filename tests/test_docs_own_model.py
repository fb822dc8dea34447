"""The docs page "Use the layers in your own model": its backbone and save/load code runs as written."""

import re
import textwrap
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "own_model.rst"
FIRST_RUNNABLE_SECTION = "With timm or torchvision backbones"


def runnable_blocks() -> list[str]:
    """The ``.. code-block:: python`` blocks from the backbone section on, dedented, in order."""
    text = PAGE.read_text()
    text = text[text.index(FIRST_RUNNABLE_SECTION):]
    blocks = re.findall(r"^\.\. code-block:: python\n\n((?:(?:   .*)?\n)+)", text, flags=re.M)
    return [textwrap.dedent(block) for block in blocks]


def test_the_page_has_the_backbone_and_save_load_blocks():
    blocks = runnable_blocks()
    assert len(blocks) == 3
    assert "forward_features" in blocks[0] and "create_feature_extractor" in blocks[0]
    assert "load_state_dict" in blocks[2] and "PseudoLabelBank.load" in blocks[2]


def test_backbone_and_save_load_blocks_run():
    pytest.importorskip("timm", reason="the page's backbone examples need timm (umilayers[vision])")
    pytest.importorskip("torchvision", reason="the page's backbone examples need torchvision (umilayers[vision])")
    namespace = {"__name__": "__own_model_page__"}
    for block in runnable_blocks():
        exec(compile(block, str(PAGE), "exec"), namespace)
    assert tuple(namespace["out"].branch_outputs.shape) == (2, 2, 10)
