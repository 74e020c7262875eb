"""appeal-mailer: send campaign appeals to a mailing list through your own SMTP server."""

__version__ = "0.1.0.dev0"
