from linernotes.cli import run

run()
