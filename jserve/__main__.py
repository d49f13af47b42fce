from jserve.cli.main import run

run()
