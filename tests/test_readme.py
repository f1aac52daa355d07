"""The README's quick start and the docs' examples run as written (in a temporary folder); every relative link of
the README and the docs pages resolves."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
REWARDS_PAGE = REPO / "docs" / "rewards.md"


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


def _block_after(marker: str, language: str, page: Path = REWARDS_PAGE) -> str:
    text = page.read_text()
    start = text.index(marker)
    match = re.search(rf"```{language}\n(.*?)```", text[start:], flags=re.DOTALL)
    return match.group(1)


def test_write_your_own_reward_example(tmp_path, monkeypatch):
    import yaml

    from balcaprl.rewards import get_reward_funcs, get_reward_weights

    (tmp_path / "my_rewards.py").write_text(_block_after("<!-- file: my_rewards.py -->", "python"))
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = yaml.safe_load(_block_after("<!-- recipe: reward_funcs -->", "yaml"))["reward_funcs"]
    funcs = get_reward_funcs(specs, judge_base_url="http://127.0.0.1:9/v1", judge_model="judge")
    assert [f.__name__ for f in funcs] == ["precision", "recall", "linguistic", "brevity", "mentions_keyword"]
    assert get_reward_weights(specs) == [1.0, 1.0, 1.0, 0.5, 0.25]
    brevity, keyword = funcs[3], funcs[4]
    completions = [[{"role": "assistant", "content": text}] for text in ("a red circle", "a very long red circle")]
    references = [["one red circle", "a red circle here"]] * 2
    assert brevity(prompts=None, completions=completions, references=references) == [1.0, pytest.approx(1 / 3)]
    assert keyword(prompts=None, completions=completions) == [1.0, 1.0]


def test_readme_is_short_and_its_links_resolve():
    assert len(README.read_text().splitlines()) <= 250
    pages = [README, *sorted((REPO / "docs").glob("*.md"))]
    linked = set()
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.name} links to {target}, which does not exist"
            if page == README:
                linked.add(path)
    # every docs page is reachable from the README
    assert {page.resolve() for page in pages[1:]} <= linked
