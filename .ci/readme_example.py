"""Run every ```python block of the README, in order, in one namespace (CI: from an installed wheel)."""

import re
import sys
from pathlib import Path

blocks = re.findall(r"```python\n(.*?)```", Path(sys.argv[1]).read_text(), flags=re.S)
if not blocks:
    sys.exit(f"{sys.argv[1]}: no ```python block")
namespace: dict = {}
for number, code in enumerate(blocks, 1):
    print(f"--- README example {number} of {len(blocks)}")
    exec(compile(code, f"README.md python block {number}", "exec"), namespace)
