"""`python -m agent` runs the oneback command line."""

from agent.cli import main

main()
