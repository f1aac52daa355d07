"""The README's quick start runs as written (in a temporary folder)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    quick_start = next(block for block in blocks if "trainer.train()" in block)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(quick_start, "README.md quick start", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 10
    assert (tmp_path / "runs" / "tiny-qwen" / "config.json").is_file()
    assert any("length/masked_frac" in log for log in trainer.state.log_history)
