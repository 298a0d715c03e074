from dialogsum.cli import app

app(prog_name="dialogsum")
