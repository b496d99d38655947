"""README.md's two set-up-and-go commands stay at its top, and CI runs the same test command."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_commands_match_ci():
    readme = (REPO / "README.md").read_text().splitlines()
    start = readme.index("```bash")
    main_cmd, test_cmd, end = readme[start + 1:start + 4]
    assert end == "```"
    assert main_cmd.endswith("python scripts/pretrain.py")
    assert "pytest" in test_cmd
    ci = (REPO / ".ci" / "run").read_text()
    steps = test_cmd.split(" && ")
    installs, run_tests = [s for s in steps if s.startswith("pip install")], steps[-1]
    assert installs[0].startswith("pip install torch==2.13.0")
    for install in installs:  # CI runs the same installs (quietly) and the same test command
        assert install.replace("pip install", "pip install -q") in ci, install
    assert run_tests in ci.splitlines()
