"""bench/gpu_check.sh where there is no GPU: valid bash, every test it names exists and is marked cuda (and
every cuda test is named), they skip here with the reason, and bench/gpu_report.py tabulates what pytest wrote.

One pytest run over tests/cuda with ``-m cuda`` (the script's selection) gives the JUnit report all three use."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.cuda.helpers import NO_CUDA, REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"


def named_tests() -> list[str]:
    """The node ids in the script's CUDA_TESTS=( ... ) array."""
    block = re.search(r"^CUDA_TESTS=\(\n(.*?)^\)", SCRIPT.read_text(), re.S | re.M)
    assert block, f"{SCRIPT} has no CUDA_TESTS=( ... ) array"
    return block.group(1).split()


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh", "gpu.sh"])
def test_the_gpu_scripts_are_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(REPO / "bench" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def cuda_junit(tmp_path_factory):
    """pytest over tests/cuda as the script runs it (-m cuda), with its JUnit report; no GPU visible even on a
    machine that has one, so the tests are collected and skipped, never run twice."""
    junit = tmp_path_factory.mktemp("gpu-check") / "cuda-tests.xml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-q",
                             "--junitxml", str(junit), "tests/cuda"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return junit


def _node_ids(junit) -> list[str]:
    return [f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"
            for case in ET.parse(junit).getroot().iter("testcase")]


def test_every_test_the_script_names_exists_and_every_cuda_test_is_named(cuda_junit):
    named = named_tests()
    assert len(set(named)) == len(named), named
    # Node ids without the parameters: what the script passes to pytest, which runs every parameter of each.
    assert {node.split("[")[0] for node in _node_ids(cuda_junit)} == set(named)


def test_without_cuda_every_cuda_test_skips_with_the_reason(cuda_junit):
    cases = list(ET.parse(cuda_junit).getroot().iter("testcase"))
    assert cases and all(case.find("skipped") is not None for case in cases)
    assert {case.find("skipped").get("message") for case in cases} == {NO_CUDA}


def test_the_report_lists_every_test_and_says_the_benchmark_is_missing(cuda_junit, tmp_path):
    report = subprocess.run([sys.executable, "bench/gpu_report.py", "--junit", str(cuda_junit), "--bench",
                             str(tmp_path / "gpu-bench.json")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    rows = [line for line in report.stdout.splitlines() if line.startswith("| `tests/cuda/")]
    assert sorted(row.split("`")[1] for row in rows) == sorted(_node_ids(cuda_junit))
    assert f"No benchmark result: {tmp_path / 'gpu-bench.json'} was not written" in report.stdout
