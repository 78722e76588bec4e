from personalab.cli import app

app(prog_name="personalab")
