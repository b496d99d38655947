"""README.md's two set-up-and-go commands stay at its top, and CI runs the same test command."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_commands_match_ci():
    readme = (REPO / "README.md").read_text().splitlines()
    start = readme.index("```bash")
    main_cmd, test_cmd, end = readme[start + 1:start + 4]
    assert end == "```"
    assert main_cmd.endswith("&& memtrain pretrain")  # the installed command, not a checkout script
    assert "pytest" in test_cmd
    ci = (REPO / ".ci" / "run").read_text()
    steps = test_cmd.split(" && ")
    installs, run_tests = [s for s in steps if s.startswith("pip install")], steps[-1]
    assert installs[0].startswith("pip install torch==2.13.0")
    for install in installs:  # CI runs the same installs (quietly) and the same test command
        assert install.replace("pip install", "pip install -q") in ci, install
    assert run_tests in ci.splitlines()


def test_ci_runs_the_installed_wheel_before_the_tests():
    """CI proves a user who installs the wheel (not the editable checkout) next to torch can run the main job: the
    wheel is built, installed into a fresh venv, and `memtrain pretrain` / `memtrain list` run outside the checkout,
    all before README's test command, which stays CI's last line."""
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    readme = (REPO / "README.md").read_text().splitlines()
    test_cmd = readme[readme.index("```bash") + 2].split(" && ")[-1]
    assert ci[-1] == test_cmd

    def first(prefix):
        return next(i for i, line in enumerate(ci) if line.startswith(prefix))

    wheel, venv, install = first("pip wheel"), first('python3 -m venv "$wheel_check'), first('"$wheel_check/venv/bin/pip" install')
    leave, pretrain, listing = first('cd "$wheel_check"'), first("venv/bin/memtrain pretrain"), first("venv/bin/memtrain list")
    assert first("pip install -q torch==2.13.0 -e") < wheel < venv < install < leave < min(pretrain, listing)
    assert max(pretrain, listing) < len(ci) - 1
    assert "--system-site-packages" not in ci[venv] and "torch==2.13.0" in ci[install] and ".whl" in ci[install]
    assert "--max_steps 3" in ci[pretrain]
