"""`python -m proxy` is `teamup-proxy`."""

from .cli import main

main()
