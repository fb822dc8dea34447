import os

import pytest
import torch
from hypothesis import settings

# Property tests must stay fast on a 2-core CI machine; CI=true uses the same profile.
settings.register_profile("default", max_examples=25, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


def _snapshot(folder):
    """Every path under ``folder`` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def refused(capsys):
    """``refused(main, argv, folder, expected)``: the command exits with status 2 and exactly one
    stderr line holding ``expected`` (returned), having written nothing under ``folder``."""

    def check(main, argv, folder, expected):
        before = _snapshot(folder)
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse's own refusals
            code = exit_.code
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2, lines
        assert len(lines) == 1, lines
        assert expected in lines[0], lines[0]
        assert "Traceback" not in lines[0]
        assert _snapshot(folder) == before, "the refused command wrote something"
        return lines[0]

    return check
