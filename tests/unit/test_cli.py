"""CLI: serve flags mirror Settings and VLM_* env vars; make-tiny-model writes a checkpoint."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.cli import build_parser, main, settings_from_args, unknown_env_warnings
from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_serve_flags_mirror_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_API_KEYS", "env-a, env-b")
    monkeypatch.setenv("VLM_PORT", "9000")
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "/m",
            "--served-model-name",
            "a/b",
            "--served-model-name",
            "c",
            "--quantization",
            "bnb-4bit",
            "--no-quantize-vision",
            "--port",
            "8001",
        ]
    )
    settings = settings_from_args(args)
    assert settings.model == "/m"
    assert settings.served_model_names() == ["a/b", "c"]
    assert settings.quantization == "bnb-4bit" and settings.quantize_vision is False
    assert settings.port == 8001  # the flag wins over VLM_PORT
    assert settings.api_keys == ["env-a", "env-b"]  # from the env, comma-separated


def test_served_model_name_defaults_to_model() -> None:
    settings = settings_from_args(build_parser().parse_args(["serve", "--model", "Qwen/X"]))
    assert settings.served_model_names() == ["Qwen/X"]


def test_bad_flag_values_are_refused() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantization", "gptq"])
    with pytest.raises(ValueError):
        settings_from_args(build_parser().parse_args(["serve", "--device", "tpu"]))
    # lists that would match nothing, silently: a URL where a host goes, an origin with a path
    for flag, value, words in (
        ("--allowed-media-domains", "http://media.example.com/x", "is not a host name"),
        ("--allowed-media-domains", "media.example.com:0", "the port must be"),
        ("--allowed-media-domains", "media.example.com:http", "is not a host name"),
        ("--allowed-media-domains", "10.0.0.5:99999", "the port must be"),
        ("--allowed-origins", "notaurl", "is not a web origin"),
        ("--allowed-origins", "https://app.example.com/", "is not a web origin"),
        ("--forwarded-allow-ips", "proxy.internal", "is not an address or network"),
        ("--forwarded-allow-ips", "10.0.0.0/33", "is not an address or network"),
    ):
        with pytest.raises(ValueError, match=words):
            settings_from_args(build_parser().parse_args(["serve", flag, value]))
    hosts = "Media.Example.com.,10.0.0.5,media_store,fd00::5,Store.internal.:8080,[FD00::5]:0443"
    fine = ["--allowed-media-domains", hosts, "--allowed-media-domains", "10.0.0.6:80"]
    fine += ["--allowed-origins", "http://localhost:3000", "--allowed-origins", "*"]
    fine += ["--forwarded-allow-ips", "10.0.0.5,10.1.0.0/16", "--forwarded-allow-ips", "fd00::/8"]
    settings = settings_from_args(build_parser().parse_args(["serve", *fine]))
    assert settings.forwarded_allow_ips == ["10.0.0.5", "10.1.0.0/16", "fd00::/8"]
    assert settings.allowed_media_domains == [
        "media.example.com",
        "10.0.0.5",
        "media_store",
        "fd00::5",
        "store.internal:8080",
        "[fd00::5]:443",
        "10.0.0.6:80",
    ]


def test_make_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "tiny25"
    assert main(["make-tiny-model", str(out), "--family", "qwen2.5-vl", "--hidden-size", "32"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert config["text_config"]["hidden_size"] == 32
    assert main(["make-tiny-model", str(tmp_path / "bad"), "--vision-heads", "3"]) == 2


def test_json_logs_carry_the_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    from server.log import configure_logging, request_id_var

    configure_logging("info", "json")
    request_id_var.set("req-42")
    logging.getLogger("server.test").info("hello %s", "there")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    entry = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])  # ISO-8601 UTC
    assert entry | {"time": None} == {
        "time": None,
        "level": "INFO",
        "logger": "server.test",
        "request_id": "req-42",
        "message": "hello there",
    }
    # uvicorn's INFO lines come from a logger it names uvicorn.error: named for what they are
    logging.getLogger("uvicorn.error").info("Started server process")
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (entry["level"], entry["logger"]) == ("INFO", "uvicorn")
    logging.getLogger().handlers = []


def test_text_logs_keep_a_record_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """What a client sent (a path with %0A, an id) cannot forge a log line: control characters
    are escaped; a traceback still has its lines."""
    from server.log import configure_logging

    configure_logging("info", "text")
    logging.getLogger("server.test").info("GET %s 401", "/v1/x\n2026 INFO fake\r\x1b[2J")
    try:
        raise ValueError("inner")
    except ValueError:
        logging.getLogger("server.test").exception("failed")
    logging.getLogger("transformers.tokenization_utils_base").warning("too long")
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].endswith("GET /v1/x\\n2026 INFO fake\\r\\x1b[2J 401")
    assert lines[1].endswith("failed") and lines[2] == "Traceback (most recent call last):"
    # transformers' own warnings in the server's format, not on a handler of their own
    assert re.search(r"Z WARNING transformers\.tokenization_utils_base \[.*\] too long$", lines[-1])
    logging.getLogger().handlers = []


def test_vlm_api_key_is_the_flags_env_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_API_KEY", "secret")
    assert settings_from_args(build_parser().parse_args(["serve"])).api_keys == ["secret"]
    monkeypatch.delenv("VLM_API_KEY")
    monkeypatch.setenv("API_KEYS", "not-ours")  # only VLM_-prefixed names are read
    assert settings_from_args(build_parser().parse_args(["serve"])).api_keys == []


def test_unknown_vlm_variables_are_named_with_the_closest_setting() -> None:
    warnings = unknown_env_warnings({"VLM_MAX_NUM_SEQ": "3", "VLM_PORT": "1", "HOME": "/"})
    assert warnings == [
        "VLM_MAX_NUM_SEQ is not a vlm-server setting and is ignored; did you mean VLM_MAX_NUM_SEQS?"
    ]
    assert unknown_env_warnings({"VLM_API_KEY": "k", "VLM_CODE_ROOT": "/x"}) == []


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--port", "abc"], "--port 'abc': must be a whole number"),
        (["--device", "gpu"], "--device 'gpu': device must be auto, cpu, cuda or cuda:N"),
        (["--kv-cache-memory", "lots"], "--kv-cache-memory 'lots': must be a number"),
        (["--max-num-seqs", "0"], "--max-num-seqs '0': must be at least 1"),
        (["--job-lease", "0.5"], "--job-lease '0.5': must be at least 2.0"),
        (
            ["--webhook-retry-delays", "abc"],
            "--webhook-retry-delays 'abc': webhook retry delay 'abc' is not a number",
        ),
        (["--model", "/nonexistent/path"], "--model '/nonexistent/path': no such directory"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_code_2(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(line) and len(err.splitlines()) == 1
    logging.getLogger().handlers = []


def test_a_bad_env_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VLM_PORT", "http")
    assert main(["serve"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--port 'http' (from VLM_PORT): must be a whole number")
    )


def test_argparse_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--quantization", "gptq"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_port_in_use_is_found_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        # A model that does not exist: the port is checked first, so loading never starts.
        argv = ["serve", "--port", port, "--model", "Qwen/not-here", "--models-dir", str(tmp_path)]
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen there" in err and "Qwen/not-here" not in err
    logging.getLogger().handlers = []


def test_an_address_it_cannot_listen_on_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "no API key, listening on 999.1.1.1" first: the warnings wait until it can start."""
    argv = ["serve", "--host", "999.1.1.1", "--model", "Qwen/not-here"]
    assert main([*argv, "--models-dir", str(tmp_path), "--data-dir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--host 999.1.1.1 --port" in lines[0], lines
    logging.getLogger().handlers = []


def test_a_path_like_model_without_a_checkpoint_is_not_looked_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "not a checkpoint (no config.json in it)" in capsys.readouterr().err
    logging.getLogger().handlers = []


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--kv-cache-memory", "0.0000001"], "cannot hold one block of 16 tokens: raise --gpu"),
        (
            ["--kv-cache-memory", "0.0001", "--max-model-len", "4096"],
            "--max-model-len 4096 is more than the KV cache holds (",
        ),
    ],
)
def test_a_kv_budget_that_holds_too_little_is_one_line_and_exit_code_2(
    flags: list[str],
    said: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["serve", "--model", str(tiny_model_dir), *flags]
    argv += ["--port", "0", "--data-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert said in err
    assert "Traceback" not in err
    logging.getLogger().handlers = []


def test_secrets_are_not_echoed_in_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--webhook-secret", "whsec_not-base64!"]) == 2
    err = capsys.readouterr().err
    assert "--webhook-secret '(hidden)': must be whsec_ followed by a base64 key" in err
    assert "not-base64" not in err
    for keys in (["sk-secret one two"], ["sk-secret a", "sk-secret b"]):  # bad, or twice
        argv = ["serve"] + [arg for key in keys for arg in ("--api-key", key)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "API key" in err and "sk-secret" not in err, err
    # a job store URL: shown (which one is wrong), its password hidden
    for url, shown in (
        ("mysql://user:pw-secret@db/jobs", "'mysql://user:***@db/jobs'"),
        ("mysql://x@y/z", "'mysql://x@y/z'"),
        ("mysql://user:pw-s@cret@db/jobs", "'mysql://user:***@db/jobs'"),
        ("mysql://db/jobs?user=u&password=pw-secret", "'mysql://db/jobs?user=u&password=***'"),
    ):
        assert main(["serve", "--job-store", url]) == 2
        err = capsys.readouterr().err
        assert f"--job-store {shown}" in err and "pw-s" not in err, err


def test_files_and_directories_are_checked_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--api-key-file", str(tmp_path / "keys.txt")]) == 2
    assert main(["serve", "--allowed-local-media-path", str(tmp_path / "media")]) == 2
    err = capsys.readouterr().err
    assert "keys.txt': no such file" in err and "media': no such directory" in err
    # a key file of no key (an empty secret mount) would serve without authentication
    (tmp_path / "empty.txt").write_text("# none yet\n\n")
    assert main(["serve", "--api-key-file", str(tmp_path / "empty.txt")]) == 2
    assert "holds no API key" in capsys.readouterr().err
    # directories: one line naming the flag, before the model loads, no traceback
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for flag, words in (
        ("--data-dir", "not a directory"),
        ("--models-dir", "not a directory"),
    ):
        assert main(["serve", "--model", "tiny", flag, str(a_file)]) == 2
        err = capsys.readouterr().err
        assert f"{flag} '{a_file}': {words}" in err and "Traceback" not in err, err
    assert main(["serve", "--model", "tiny", "--data-dir", str(a_file / "under")]) == 2
    assert "cannot write there" in capsys.readouterr().err
    # a tiny model to build where nothing can be written: the flag to change, no errno
    models = a_file / "models"
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["serve", "--model", "tiny", "--models-dir", str(models), *data]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint under --models-dir '{models}' (not a directory)" in err, err
    assert "Errno" not in err and "Traceback" not in err, err


def test_a_job_store_that_cannot_be_used_is_one_line_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    not_sqlite = tmp_path / "data" / "jobs.sqlite3"
    not_sqlite.parent.mkdir()
    not_sqlite.write_text("not a database")
    for extra in (["--job-store", f"sqlite:///{tmp_path}"], ["--data-dir", str(not_sqlite.parent)]):
        assert main(["serve", "--model", "tiny", "--models-dir", str(models), *extra]) == 2
        err = capsys.readouterr().err
        assert "--job-store: cannot use the SQLite database" in err, err
        assert "Traceback" not in err
    assert not models.exists()  # (refused before the tiny model was built or loaded)


def test_authentication_off_by_a_slip_is_refused_or_warned_of(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server.cli import exposure_warnings

    for blank in (" ", ", ,"):  # set, but to no key: refused (empty is unset: no keys)
        monkeypatch.setenv("VLM_API_KEYS", blank)
        with pytest.raises(ValidationError, match="holds no API key"):
            Settings()
    monkeypatch.setenv("VLM_API_KEYS", "")
    assert Settings().all_api_keys() == {}
    # no key where others can reach it; an env var a flag overrides (named, never its value)
    open_to_all = exposure_warnings(Settings(host="0.0.0.0"), [])
    assert len(open_to_all) == 1 and "no API key, listening on 0.0.0.0" in open_to_all[0]
    assert exposure_warnings(Settings(), []) == []  # (127.0.0.1)
    monkeypatch.setenv("VLM_API_KEY", "env-key")
    (warning,) = exposure_warnings(Settings(api_keys=["flag-key"]), ["api_keys"])
    assert "VLM_API_KEY is ignored" in warning and "env-key" not in warning


def test_settings_that_do_nothing_without_keys_are_warned_of() -> None:
    from server.cli import idle_flag_warnings

    idle = {
        "metrics_require_api_key": True,
        "scheduling_policy": "fair",
        "webhook_secret_per_project": True,
    }
    assert [w.split()[0] for w in idle_flag_warnings(Settings(**idle))] == [
        "--metrics-require-api-key",
        "--webhook-secret-per-project",
        "--scheduling-policy",
    ]
    assert idle_flag_warnings(Settings(**idle, api_keys=["k"])) == []


def test_the_start_up_log_tells_the_projects_apart() -> None:
    from server.api.server import projects_line
    from server.jobs.project import ProjectLabels, named_projects, of_key

    keys = Settings(api_keys=["sk-0123456789abcdef", "sk-b team", "sk-c team", "tiny", "k key-x"])
    named = named_projects(keys.all_api_keys())
    assert named == {"team", "key-x"}
    label = ProjectLabels("x" * 64, named)  # (as /metrics labels them)
    assert label("team") == "team" and label("key-x") == "key-x"  # named: their names
    own = label(of_key("sk-0123456789abcdef"))
    assert own.startswith("key-") and own != of_key("sk-0123456789abcdef")
    assert ProjectLabels("y" * 64, named)(of_key("sk-0123456789abcdef")) != own  # (its secret)
    line = projects_line(keys.all_api_keys(), label)
    assert "team (2 keys)" in line and f"{own} (the key ending ...cdef)" in line
    assert label(of_key("tiny")) in line and "...tiny" not in line and "sk-b" not in line
    assert of_key("tiny") not in line


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_serve_reads_the_servers_own_variables() -> None:
    """`make serve` passes --model/--host/--port, which beat VLM_MODEL/HOST/PORT: so where
    MODEL=/HOST=/PORT= are not given it takes the VLM_ ones (Configuration's promise)."""

    def planned(env: dict[str, str], *assignments: str) -> str:
        command = ["make", "-n", "--no-print-directory", "-C", str(ROOT), "serve", *assignments]
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("VLM_", "MAKE"))}
        done = subprocess.run(command, env={**keep, **env}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    assert "--model tiny --host 127.0.0.1 --port 8000 --default-max-tokens 256" in planned({})
    line = planned({"VLM_MODEL": "/m/x", "VLM_HOST": "0.0.0.0", "VLM_PORT": "8001"})
    assert "--model /m/x --host 0.0.0.0 --port 8001" in line
    assert "--default-max-tokens" not in line  # (a real checkpoint: its own default)
    assert "--port 9" in planned({"VLM_PORT": "8001"}, "PORT=9")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_refuses_a_python_older_than_311_in_one_line(tmp_path: Path) -> None:
    """transformers 5 needs Python 3.11: on an older python3 (Ubuntu 22.04's 3.10) `make serve`
    says so and how to name another, rather than pip's resolver error about transformers."""
    old = tmp_path / "python3.10"
    old.write_text(
        '#!/bin/sh\n[ "$1" = -V ] && echo "Python 3.10.12" && exit 0\n'
        '[ "$1" = -c ] && exec python3 -c "import sys; sys.exit(1)"\nexit 3\n'
    )
    old.chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "serve", f"PYTHON={old}", f"VENV={venv}"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and not venv.exists()
    assert f"Python 3.11+ is needed ({old} is Python 3.10.12): make serve PYTHON=python3.11" in (
        done.stderr
    )


def test_redeliver_webhooks_reads_serves_job_store(tmp_path: Path, capsys) -> None:
    """The operator's way to send webhooks again after a receiver's long outage: the same
    --data-dir (or --job-store) as serve; a directory with no job store is one line, not a new
    empty store."""
    from server.jobs.store import open_job_store

    store = open_job_store(None, tmp_path)
    job = store.create("categories", {"webhook_url": "http://h/"}, None)
    claimed = store.claim(lease_s=60)
    assert claimed is not None and store.complete(claimed, {"ok": True})
    (delivery,) = store.due_deliveries()
    assert store.record_attempt(delivery["id"], 1, "failed", 0.0, None, "timed out")
    store.close()
    assert main(["redeliver-webhooks", "--data-dir", str(tmp_path), "--job", job.id]) == 0
    store = open_job_store(None, tmp_path)
    assert [d["id"] for d in store.due_deliveries()] == [delivery["id"]]
    store.close()
    # a job that is not there is named (it said "0 ... queued again"); nothing is sent again
    store = open_job_store(None, tmp_path)
    assert store.record_attempt(delivery["id"], 1, "failed", 0.0, None, "timed out")
    store.close()
    capsys.readouterr()
    wrong = ["redeliver-webhooks", "--data-dir", str(tmp_path), "--job", job.id, "--job", "job-x"]
    assert main(wrong) == 2
    assert "--job job-x: no such job in this job store" in capsys.readouterr().err
    store = open_job_store(None, tmp_path)
    assert store.due_deliveries() == []
    store.close()
    # nothing to send again says why: the deliveries asked about, by status
    assert main(["redeliver-webhooks", "--data-dir", str(tmp_path), "--job", job.id]) == 0
    assert main(["redeliver-webhooks", "--data-dir", str(tmp_path), "--job", job.id]) == 0
    assert "the job's webhook deliveries: 1 pending" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["redeliver-webhooks", "--data-dir", str(tmp_path), "--since-hours", "-1"])
    assert exited.value.code == 2
    assert "'-1': must be a finite number above 0" in capsys.readouterr().err
    assert main(["redeliver-webhooks", "--data-dir", str(tmp_path / "elsewhere")]) == 2
    assert not (tmp_path / "elsewhere").exists()
    # a store that cannot be used is one line too, as serve's (it was a traceback)
    assert main(["redeliver-webhooks", "--job-store", "mysql://x"]) == 2
    missing = "postgresql://postgres@127.0.0.1:5432/no_such_database_here"
    assert main(["redeliver-webhooks", "--job-store", missing]) == 2


def test_webhook_secret_prints_the_shared_or_a_projects_secret(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """The secret a receiver checks with, from serve's job store: the shared one, or a
    project's (--project: a name from the key file, or a key's own project as serve's start-up
    line names it; --api-key KEY: that key's project); one line and exit 2 for a store without
    one yet, a project or key serve's keys do not hold, or no keys to check against."""
    from server.jobs.project import ProjectLabels, named_projects, of_key
    from server.jobs.store import open_job_store
    from server.jobs.webhooks import load_or_create_secret, project_secret

    for name in ("VLM_API_KEYS", "VLM_API_KEY", "VLM_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    args = ["webhook-secret", "--data-dir", str(tmp_path)]
    store = open_job_store(None, tmp_path)
    store.close()
    assert main(args) == 2  # (no secret yet: serve makes it at its first start)
    store = open_job_store(None, tmp_path)
    shared = load_or_create_secret(None, store, tmp_path)
    label_key = store.shared_value("metrics_label_key", "z" * 64)  # (as serve's start makes it)
    store.close()
    keys = tmp_path / "keys.txt"
    keys.write_text("# keys\nsk-named team-a\nsk-alone\n")

    def printed(*more: str) -> str:
        capsys.readouterr()
        assert main([*args, *more]) == 0
        return capsys.readouterr().out.strip()

    assert printed() == shared == (tmp_path / "webhook_secret").read_text()
    # without serve's keys nothing can be checked: refused, not a secret that may never verify
    assert main([*args, "--project", "team-a"]) == 2
    assert main([*args, "--api-key", "sk-alone"]) == 2
    with_keys = ("--api-key-file", str(keys))
    team_a = printed("--project", "team-a", *with_keys)
    assert team_a == project_secret(shared, "team-a") != shared
    assert printed("--api-key", "sk-named", *with_keys) == team_a
    alone = printed("--api-key", "sk-alone", *with_keys)
    assert alone == project_secret(shared, of_key("sk-alone"))
    # the key's own project by the name serve's start-up line and /metrics give it
    serves_name = ProjectLabels(label_key, named_projects({"sk-named": "team-a"}))(
        of_key("sk-alone")
    )
    assert serves_name != of_key("sk-alone")
    assert printed("--project", serves_name, *with_keys) == alone
    assert main([*args, "--project", of_key("sk-alone"), *with_keys]) == 2
    assert main([*args, "--project", "no spaces", *with_keys]) == 2
    assert main([*args, "--api-key", "k", "--api-key-file", str(tmp_path / "none")]) == 2
    # serve's keys as serve reads them, from its env vars too; a typo is refused
    monkeypatch.setenv("VLM_API_KEY_FILE", str(keys))
    assert printed("--api-key", "sk-named") == team_a
    assert printed("--api-key", "sk-alone") == alone
    assert main([*args, "--api-key", "sk-unknown"]) == 2
    assert main([*args, "--project", "team-b"]) == 2
    monkeypatch.delenv("VLM_API_KEY_FILE")
    monkeypatch.setenv("VLM_API_KEYS", "sk-x team-x")
    assert printed("--api-key", "sk-x") == printed("--project", "team-x")
    assert main([*args, "--project", "team-a"]) == 2


def test_a_second_ctrl_c_says_where_the_running_jobs_are() -> None:
    """Put back at the first signal (how many), none running, or some that could not be put
    back (the store was down) or the put-back not over: their lease brings them back."""
    import asyncio

    from server.api.server import FORCED_JOBS_LEASED, DrainingServer, forced_jobs_line

    def line(result: tuple[int, int] | None) -> str:
        server = DrainingServer.__new__(DrainingServer)
        server.putting_back = None
        if result is not None:
            loop = asyncio.new_event_loop()
            server.putting_back = loop.create_future()
            server.putting_back.set_result(result)
            loop.close()
        return forced_jobs_line(server)

    assert (
        line((2, 0))
        == "the 2 job(s) this server was running went back to the queue at the first signal"
    )
    assert line((0, 0)) == "no job was running here"
    assert line((1, 1)) == line(None) == FORCED_JOBS_LEASED


def test_a_vllm_command_line_is_taken_where_it_asks_for_what_this_server_does() -> None:
    """`vllm serve MODEL --served-model-name A B --dtype half` and the flags whose meaning is
    what this server always does (auto tool choice, the hermes parser, one GPU, remote code
    not needed) start it as they would vLLM."""
    from server.cli import _take_positional_model

    args = build_parser().parse_args(
        ["serve", "Qwen/Qwen2.5-VL-7B-Instruct", "--served-model-name", "a", "b", "--dtype"]
        + ["half", "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "-tp", "1"]
        + ["--trust-remote-code", "--served-model-name", "c", "--reasoning-parser", "qwen3"]
        + ["-pp", "1", "-dp", "1", "--enable-chunked-prefill", "--disable-log-stats"]
        + ["--enable-log-requests", "--max-model-len", "32k", "--max-num-batched-tokens", "16K"]
        + ["--generation-config", "vllm", "--override-generation-config", '{"top_k": -1}']
    )
    _take_positional_model(args)
    settings = settings_from_args(args)
    assert settings.model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert (settings.max_model_len, settings.max_num_batched_tokens) == (32_000, 16_384)
    assert settings.generation_config == "openai"
    assert settings.override_generation_config == {"top_k": -1}
    assert settings.served_model_names() == ["a", "b", "c"]
    assert settings.dtype == "float16"
    assert Settings(dtype="float").dtype == "float32"  # (VLM_DTYPE=float as --dtype float)
    # the flag repeated is no list that may have taken the model
    repeated = build_parser().parse_args(["serve", *["--served-model-name", "a"] * 2])
    _take_positional_model(repeated)
    assert settings_from_args(repeated).served_model_names() == ["a", "a"]


@pytest.mark.parametrize(
    "argv,line",
    [
        (
            ["--limit-mm-per-prompt", '{"image": 2}'],
            "unrecognized arguments: --limit-mm-per-prompt (--limit-mm-per-prompt is vLLM's; "
            "here: --max-images-per-request and --max-videos-per-request) (see --help)",
        ),
        (
            ["tiny", "--uvicorn-log-level", "debug", "--max-modle-len", "9"],
            "(--uvicorn-log-level is vLLM's; here: --log-level; --max-modle-len: did you mean "
            "--max-model-len?) (see --help)",
        ),
        (["-tp", "2"], "'2': one server runs on one GPU (run replicas sharing --job-store)"),
        # nothing like it: not "did you mean --max-model-len?"; vLLM's dotted form
        (["--max-log-len", "100"], "(--max-log-len is vLLM's; nothing like it here)"),
        (
            ["--limit-mm-per-prompt.video", "0"],
            "(--limit-mm-per-prompt is vLLM's; here: --max-images-per-request",
        ),
        (["--tool-call-parser", "llama3_json"], "invalid choice: 'llama3_json'"),
    ],
)
def test_vllms_other_flags_are_refused_saying_what_to_use_here(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlm-server serve: error: ") and line in err, err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "value,tokens", [("auto", 0), ("-1", 0), ("4K", 4096), ("25.6k", 25_600), ("1m", 10**6)]
)
def test_vllms_context_lengths(
    value: str, tokens: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    args = build_parser().parse_args(["serve", "--max-model-len", value])
    assert settings_from_args(args).max_model_len == tokens
    monkeypatch.setenv("VLM_MAX_MODEL_LEN", value)
    assert Settings().max_model_len == tokens


def test_generation_config_from_a_folder_and_overridden(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.2, "top_k": null}')
    settings = Settings(generation_config=str(tmp_path))
    assert settings.generation_config == str(tmp_path)
    # refused at start, not a traceback once the model has loaded
    for config, why in (
        ('{"temperature": "0.7"}', "temperature must be a number"),
        ("[]", "not a JSON object"),
    ):
        (tmp_path / "generation_config.json").write_text(config)
        with pytest.raises(ValidationError, match=why):
            Settings(generation_config=str(tmp_path))
    overrides = '{"temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05}'
    assert Settings(override_generation_config=overrides).override_generation_config == {
        "temperature": 0.7,
        "top_p": 0.8,
        "repetition_penalty": 1.05,
    }


@pytest.mark.parametrize(
    "argv,line",
    [
        (["--max-model-len", "1.5K"], "--max-model-len '1.5K': K counts 1,024s: a whole number"),
        (["--max-model-len", "lots"], "--max-model-len 'lots': must be a whole number"),
        (
            ["--generation-config", "greedy"],
            "--generation-config 'greedy': must be openai (vLLM's vllm), auto, or a folder "
            "holding a generation_config.json (no such folder)",
        ),
        (["--generation-config", "."], "(a folder without one)"),
        (
            ["--override-generation-config", '{"max_new_tokens": 5}'],
            "'max_new_tokens' is not one of the sampling defaults: temperature, top_p, top_k, "
            "min_p, repetition_penalty",
        ),
        (["--override-generation-config", '{"temperature": 3}'], "temperature must be from 0 to 2"),
        (["--override-generation-config", '{"top_p": "x"}'], "top_p must be a number"),
        (["--override-generation-config", '{"top_k": 2.5}'], "top_k must be a whole number"),
        (["--generation-config", ""], "a generation_config.json (none given)"),
        (["--override-generation-config", "temperature=1"], "must be a JSON object (Expecting"),
        (["--override-generation-config", "[1]"], "must be a JSON object, as"),
    ],
)
def test_vllms_value_forms_refused_in_one_line(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["serve", "tiny", "--models-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert line in err, err
    assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "argv,line",
    [
        (["x", "--model", "y"], "two models: 'x' and --model 'y'"),
        # (the name list took the model: the default would be served under its name)
        (
            ["--served-model-name", "a", "Qwen/Qwen2-VL-2B-Instruct"],
            "--served-model-name a Qwen/Qwen2-VL-2B-Instruct: is 'Qwen/Qwen2-VL-2B-Instruct' "
            "the model?",
        ),
    ],
)
def test_a_model_given_twice_or_swallowed_by_the_names_is_refused(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setenv("VLM_MODEL", "tiny")  # (as the Docker image sets it)
    assert main(["serve", *argv]) == 2
    assert line in capsys.readouterr().err


def test_vllms_variables_are_not_read_and_its_api_key_alone_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit carried over from vLLM with VLLM_API_KEY started with no authentication."""
    from server.cli import unknown_env_warnings

    environ = {"VLLM_MAX_MODEL_LEN": "5", "VLLM_USE_V1": "1", "VLLM_PORT": "tcp://10.0.0.9:80"}
    assert unknown_env_warnings(environ) == [  # (VLLM_PORT is vLLM's internal port)
        "VLLM_MAX_MODEL_LEN is not read (this server's variables start VLM_): VLM_MAX_MODEL_LEN"
    ]
    from server import vllm_flags

    on_loopback = vllm_flags.api_key_refusal({"VLLM_API_KEY": "k"}, False, loopback=True)
    assert on_loopback is not None and on_loopback[0] == "warn"  # (only this machine calls it)
    assert vllm_flags.api_key_refusal({"VLLM_API_KEY": "k"}, True, loopback=False) is None
    for name in ("VLM_API_KEYS", "VLM_API_KEY", "VLM_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "sk-1")
    argv = ["serve", "--model", "Qwen/not-here", "--models-dir", str(tmp_path), "--port", "0"]
    argv += ["--host", "0.0.0.0"]
    assert main([*argv, "--data-dir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "VLLM_API_KEY is vLLM's variable, not read here" in lines[0]
    logging.getLogger().handlers = []
