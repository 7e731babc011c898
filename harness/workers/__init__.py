"""Worker scripts run by the python of an official stack's own env (harness/envs.py), as
`ENV/bin/python harness/workers/NAME_worker.py`: they import only that stack, the stdlib and numpy, and speak
wire.py's JSON-lines protocol with harness/worker.py. Not imported by the harness itself."""
