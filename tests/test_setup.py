"""The Makefile's setup and the Allure report: two makes at once share one install, and the
report shows every test as its own case, titled in words, with its environment; CI lints
before it tests, and coverage counts what the server subprocesses run."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import allure
import coverage

from conftest import DEADLINE, ROOT

pytestmark = [allure.feature("Setup and report")]

TEST_FILES = [ROOT / "test_grpc_system.py", *sorted((ROOT / "tests").glob("test_*.py"))]


def function_lines(path, name):
    """The line numbers of a top-level function's body."""
    function = next(node for node in ast.parse(path.read_text()).body
                    if isinstance(node, ast.FunctionDef) and node.name == name)
    return set(range(function.body[0].lineno, function.end_lineno + 1))

def features_in_tests():
    """Every feature label the test files give the report."""
    return {feature for path in TEST_FILES
            for feature in re.findall(r'allure\.feature\("([^"]+)"\)', path.read_text())}


@allure.story("Make targets")
def test_two_makes_at_once_set_up_the_venv_once_and_both_succeed(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path)
    (tmp_path / "requirements.txt").write_text("# nothing to install\n")
    with allure.step("make venv twice at once"):
        makes = [subprocess.Popen(["make", "--no-print-directory", "venv",
                                   f"PYTHON={sys.executable}"], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
        outputs = [make.communicate(timeout=DEADLINE * 8)[0] for make in makes]
    with allure.step("both succeed; one set it up while the other waited"):
        assert [make.returncode for make in makes] == [0, 0], outputs
        assert "".join(outputs).count("setting up .venv") == 1, outputs
        assert (tmp_path / ".venv" / "bin" / "python").exists()
        assert len(list((tmp_path / ".venv").glob(".installed-*"))) == 1


@allure.story("Make targets")
def test_make_test_starts_from_empty_allure_results():
    plan = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True,
                          timeout=DEADLINE, check=True).stdout
    pytest_line = next(line for line in plan.splitlines() if "-m pytest" in line)
    assert "--alluredir=allure-results --clean-alluredir" in pytest_line


@allure.story("Lint and coverage")
def test_ci_runs_ruff_and_mypy_before_the_tests():
    steps = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.startswith("make ")]
    assert steps == ["make lint", "make test"]
    plan = subprocess.run(["make", "-n", "lint"], cwd=ROOT, capture_output=True, text=True,
                          timeout=DEADLINE, check=True).stdout
    commands = [line.split() for line in plan.splitlines()
                if line.split(" ", 1)[0].endswith(("/ruff", "/mypy"))]
    assert [[os.path.basename(words[0]), *words[1:]] for words in commands] == [
        ["ruff", "check", "."], ["mypy"]]  # mypy checks the files pyproject.toml names


@allure.story("Lint and coverage")
def test_coverage_counts_the_lines_a_server_subprocess_runs(tmp_path):
    """serve() runs only in `python server.py`, a subprocess of the test under coverage."""
    data_file = tmp_path / ".coverage"
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("COVERAGE_")}  # this run's own, even under make coverage
    with allure.step("a test that starts server.py twice, under coverage as make coverage runs"):
        subprocess.run(
            [sys.executable, "-m", "coverage", "run", "-m", "pytest", "-q", "-p",
             "no:cacheprovider", "test_grpc_system.py", "-k", "signal_stops_cleanly and 15"],
            cwd=ROOT, env={**env, "COVERAGE_FILE": str(data_file)}, capture_output=True,
            timeout=DEADLINE * 8, check=True)
        subprocess.run([sys.executable, "-m", "coverage", "combine", "--quiet"], cwd=ROOT,
                       env={**env, "COVERAGE_FILE": str(data_file)}, timeout=DEADLINE * 2,
                       check=True)
    with allure.step("the lines serve() ran in the server subprocesses are counted"):
        data = coverage.CoverageData(basename=str(data_file))
        data.read()
        measured = set(data.lines(str(ROOT / "server.py")) or ())
        assert measured & function_lines(ROOT / "server.py", "serve")


@allure.story("Allure report")
def test_readme_lists_the_features_the_report_groups_by():
    readme = " ".join((ROOT / "README.txt").read_text().split())
    listed = re.search(r"The report groups tests by feature \(([^)]+)\)", readme)[1]
    assert set(listed.split(", ")) == features_in_tests()


@allure.story("Allure report")
def test_each_parametrised_case_is_its_own_case_titled_in_words(tmp_path):
    results = tmp_path / "allure-results"
    with allure.step("pytest writes results for cases whose parameters are bytes"):
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "tests/test_robustness.py", "-k", "malformed_request_bytes and SendMessage",
             f"--alluredir={results}"], cwd=ROOT, capture_output=True, text=True,
            timeout=DEADLINE * 4)
        assert run.returncode == 0, run.stdout
        ran = int(re.search(r"(\d+) passed", run.stdout)[1])
    cases = [json.loads(path.read_text()) for path in results.glob("*-result.json")]
    with allure.step("every case has its own parameters, none shown as <class 'bytes'>"):
        shown = {tuple(sorted((p["name"], p["value"]) for p in case["parameters"]))
                 for case in cases}
        assert len(cases) == len(shown) == ran
        assert not [case for case in cases
                    if any("<class" in p["value"] for p in case["parameters"])]
    with allure.step("titles are words, the case in brackets"):
        for case in cases:
            assert re.fullmatch(r"Malformed request bytes are invalid argument never internal"
                                r" \[[\w-]+\]", case["name"]), case["name"]
    with allure.step("the environment panel names the versions, the stores and the count"):
        environment = (results / "environment.properties").read_text()
        for key in ("python", "grpcio", "protobuf", "pytest", "allure-pytest", "stores"):
            assert re.search(rf"^{re.escape(key)} = \S", environment, re.MULTILINE), key
        assert f"tests.run = {ran}\n" in environment
