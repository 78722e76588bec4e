"""Progress on long work reaches a log file: lines at the start, while it runs and at the end."""

import re
import subprocess
import sys
import time

from personalab import console


def test_progress_lines_are_written_while_a_long_step_runs_when_the_output_is_a_file(monkeypatch, capsys):
    monkeypatch.setattr(console, "LOG_EVERY", 0.2)
    with console.progress_bar("generate", 10) as advance:
        advance(3)
        time.sleep(1.0)  # one step longer than the interval: the timer still writes
        advance(7)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "generate: 0/10"
    during = [line for line in lines[1:-1] if line.startswith("generate: 3/10 (30%), 0:00:0")]
    assert len(during) >= 3 and all("left" in line for line in during), lines
    assert re.fullmatch(r"generate: 10/10 \(100%\), 0:00:0\d elapsed", lines[-1])


def test_a_silenced_bar_writes_nothing(capsys):
    with console.progress_bar("generate", 10, enabled=False) as advance:
        advance(10)
    assert capsys.readouterr().out == ""


def test_a_command_logged_to_a_file_shows_its_progress(tmp_path):
    """The real console, in a process whose output goes to a file: no terminal, so plain lines."""
    code = (
        "from personalab import console\n"
        "console.LOG_EVERY = 0.1\n"
        "import time\n"
        "with console.progress_bar('judge trait', 4) as advance:\n"
        "    time.sleep(0.35); advance(4)\n"
    )
    log = tmp_path / "run.log"
    with log.open("w") as out:
        subprocess.run([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, check=True, timeout=60)
    lines = log.read_text().splitlines()
    assert lines[0] == "judge trait: 0/4" and len(lines) >= 4 and lines[-1].startswith("judge trait: 4/4 (100%)")


def test_status_lines_are_records_of_the_personalab_logger(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="personalab"):
        console.say("kept 3 of 4 pairs")
        console.say("not shown", enabled=False)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("personalab", logging.INFO, "kept 3 of 4 pairs")
    ]


def test_a_session_without_logging_shows_status_lines_and_a_configured_one_routes_them(tmp_path):
    """Unconfigured: the console handler prints each line on stdout. With ``logging.basicConfig`` the records go
    where it sends them (stderr, formatted), and nothing is printed twice."""
    plain = "from personalab.console import say\nsay('judge: lexicon')\nsay('trait: evil')\n"
    configured = "import logging\nlogging.basicConfig(level=logging.INFO, format='%(name)s|%(message)s')\n" + plain
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
            for code in (plain, configured)]  # fmt: skip
    assert runs[0].stdout.splitlines() == ["judge: lexicon", "trait: evil"] and runs[0].stderr == ""
    assert runs[1].stdout == "" and runs[1].stderr.splitlines() == [
        "personalab|judge: lexicon",
        "personalab|trait: evil",
    ]


def test_a_level_set_before_the_first_line_is_kept_and_the_command_line_puts_the_logger_back():
    """``setLevel(WARNING)`` before any line silences the lines (the lazy handler does not reset it); the command
    line's handler and level are removed when ``log_to_console``'s restore runs, as at the end of a command."""
    code = (
        "import logging\nfrom personalab.console import say\n"
        "logging.getLogger('personalab').setLevel(logging.WARNING)\nsay('hidden')\n"
        "logging.getLogger('personalab').setLevel(logging.INFO)\nsay('shown')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert run.stdout.splitlines() == ["shown"]
    import logging

    log = logging.getLogger("personalab")
    before = (list(log.handlers), log.level)
    restore = console.log_to_console(lambda m: m.upper())
    assert any(isinstance(h, console.ConsoleHandler) for h in log.handlers) and log.level == logging.INFO
    restore()
    assert (list(log.handlers), log.level) == before
