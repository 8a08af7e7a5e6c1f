"""The commands that docs/ci.md tells CI jobs to run, executed on the bundled CNN sample."""

from __future__ import annotations

import json
import shlex
import shutil
import xml.etree.ElementTree as ET

from conftest import ROOT

DOC = ROOT / "docs" / "ci.md"


def _doc_commands() -> list[str]:
    commands = []
    for line in DOC.read_text().splitlines():
        text = line.strip().removeprefix("- ").removeprefix("run: ").strip()
        if text.startswith("deadrelu scan") or text.startswith("deadrelu gate"):
            commands.append(text)
    return commands


def test_doc_has_the_commands():
    commands = _doc_commands()
    assert sum("--baseline deadrelu-baseline.json" in c for c in commands) == 3  # shell, GitHub and GitLab
    assert commands[0] == "deadrelu scan model.onnx --data calib.npz --json deadrelu-baseline.json"
    assert len(set(c for c in commands if "--baseline" in c)) == 1  # the jobs run the same command


def test_doc_commands_run(cli, tmp_path, monkeypatch):
    sample = ROOT / "sample_models" / "cnn"
    shutil.copy(sample / "model.onnx", tmp_path / "model.onnx")
    shutil.copy(sample / "calib.npz", tmp_path / "calib.npz")
    monkeypatch.chdir(tmp_path)
    for command in dict.fromkeys(_doc_commands()):
        args = shlex.split(command)[1:]
        result = cli(*args)
        assert result.code == 0, (command, result.err)
    assert ET.parse(tmp_path / "deadrelu.xml").getroot().get("failures") == "0"
    assert "| `/relu/Relu` | relu | 8 | 2 |" in (tmp_path / "deadrelu.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["model"]["format"] == "onnx"


README = ROOT / "README.md"


def _readme_examples() -> list[tuple[str, list[str]]]:
    """(command, the output the README shows under it) for every `$ …` line of its code blocks."""
    examples: list[tuple[str, list[str]]] = []
    inside, output = False, None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            inside, output = not inside, None
        elif inside and line.startswith("$ "):
            output = []
            examples.append((line[2:], output))
        elif output is not None:
            output.append(line.rstrip())
    return examples


def _matches(shown: list[str], actual: list[str]) -> bool:
    """Exactly the lines shown; where the README elides with "…", the other lines in order."""
    while shown and not shown[-1]:
        shown = shown[:-1]
    if not any("…" in line for line in shown):
        return shown == actual
    rest = iter(actual)
    return all(any(line == got for got in rest) for line in shown if "…" not in line)


def test_readme_quick_start_is_two_commands():
    text = README.read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile and "\ntrend-demo:" in makefile


def test_readme_commands_run_as_shown(cli, tmp_path, monkeypatch):
    """Every `$ deadrelu …` of the README, run from a checkout-like folder, prints what the README shows
    and exits as it says (the trend run is the one `make trend-demo` writes)."""
    import importlib.util

    (tmp_path / "sample_models").symlink_to(ROOT / "sample_models")
    (tmp_path / "build").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    spec = importlib.util.spec_from_file_location("make_trend_run", ROOT / "scripts" / "make_trend_run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert "scripts/make_trend_run.py build/trend-run" in (ROOT / "Makefile").read_text()
    script.write_run(tmp_path / "build" / "trend-run")
    examples = _readme_examples()
    assert len(examples) >= 10
    last_code, wrong = None, []
    for command, shown in examples:
        if command == "echo $?":
            assert shown == [str(last_code)], command
            continue
        deadrelu, _, jq = command.partition(" | jq ")
        assert deadrelu.startswith("deadrelu "), command
        result = cli(*shlex.split(deadrelu)[1:])
        last_code = result.code
        errors = any(line.startswith("deadrelu: error:") for line in shown)
        assert (result.code != 0) == errors, (command, result.code, result.err)
        if jq:  # `jq -c '.layers[] | {name, dead_indices}'`, done here in Python
            assert jq == "-c '.layers[] | {name, dead_indices}'", jq
            actual = [
                json.dumps(
                    {"name": layer["name"], "dead_indices": layer["dead_indices"]}, separators=(",", ":")
                )
                for layer in result.json()["layers"]
            ]
        else:
            actual = [line.rstrip() for line in (result.out + result.err).splitlines()]
        if not _matches(shown, actual):
            wrong.append(f"$ {command}\n" + "\n".join(actual))
    demo = next(line for line in (ROOT / "Makefile").read_text().splitlines() if "deadrelu scan" in line)
    shown = README.read_text().split("`make demo` prints", 1)[1].split("```", 2)[1].strip("\n").splitlines()
    result = cli(*shlex.split(demo.split("deadrelu ", 1)[1]))
    if result.code or not _matches(shown, [line.rstrip() for line in result.out.splitlines()]):
        wrong.append(f"make demo\n{result.out}{result.err}")
    assert not wrong, "the README shows other output for:\n" + "\n\n".join(wrong)
