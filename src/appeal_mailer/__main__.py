"""`python -m appeal_mailer`: the same as the `appeal-mailer` command."""

from appeal_mailer.cli import main

main()
