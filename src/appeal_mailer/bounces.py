"""Decide which permanent SMTP failures say that the mailbox does not exist (a hard bounce).

Such an address goes on the do-not-mail list: mailing it again only hurts the
sender's reputation. The rule is deliberately narrow, because a wrong "yes"
silently stops mail to a real subscriber:

1. Only a permanent failure, a 5yz reply (RFC 5321 4.2.1), can say so.
2. A reply about the sender is not about the recipient. Postfix (with
   smtpd_delay_reject) refuses an unknown envelope sender only at RCPT time,
   "550 5.1.0 <from@...>: Sender address rejected: User unknown": read as a
   recipient bounce, it would suppress the whole list.
3. An enhanced status code at the start of the reply (RFC 2034, RFC 3463)
   decides, unless it is the generic X.0.0:
   - 5.1.1 "bad destination mailbox address" (RFC 3463 3.2),
   - 5.1.0 "other address status" (RFC 3463 3.2),
   - 5.1.10 "recipient address has null MX" (RFC 7505 4.2)
   suppress. Nothing else does: not 5.2.2 "mailbox full" (the mailbox exists),
   not 5.7.x "security or policy status" (spam filters, blocks), not 5.1.2
   (the domain may come back).
4. Without one (or with X.0.0), the basic code and the words decide:
   550 "mailbox unavailable", 551 "user not local" or 553 "mailbox name not
   allowed" (RFC 5321 4.2.2) whose text says the user is unknown or does not
   exist, and says nothing of quota, policy or blocking; or 556 "domain does
   not accept mail" (RFC 7504, the reply to a null MX, RFC 7505 4.2).
"""

from __future__ import annotations

import re

# RFC 3463 2: class "." subject "." detail, each 1 to 3 digits; RFC 2034 puts it first.
_ENHANCED = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\d)")
# (subject, detail) of the enhanced codes that say the address does not exist.
_GONE_DETAILS = frozenset({(1, 0), (1, 1), (1, 10)})
_GONE_CODES = frozenset({550, 551, 553})
_NULL_MX_CODE = 556
_GONE_TEXT = re.compile(
    r"user unknown|unknown user|no such (user|mailbox|recipient|address)"
    r"|mailbox unavailable|(does not|doesn't|no longer) exist",
    re.IGNORECASE,
)
_NOT_GONE_TEXT = re.compile(
    r"quota|\bfull\b|\bspam|polic(y|ies)|\bblock|blacklist|denylist|\bdenied\b|reputation",
    re.IGNORECASE,
)
_SENDER = re.compile(r"\bsender\b", re.IGNORECASE)
# The addresses quoted in a reply: "sender" inside one is not about the sender.
_QUOTED_ADDRESS = re.compile(r"<[^>]*>|\S+@\S+")


def mailbox_gone(code: int | None, reply: str | None) -> bool:
    """True when the reply `code` `reply` says the recipient's mailbox does not exist."""
    if code is None or not 500 <= code < 600:
        return False
    text = reply or ""
    if _SENDER.search(_QUOTED_ADDRESS.sub(" ", text)):
        return False
    enhanced = _ENHANCED.match(text)
    if enhanced is not None:
        klass, subject, detail = (int(part) for part in enhanced.groups())
        if (subject, detail) != (0, 0):
            return klass == 5 and (subject, detail) in _GONE_DETAILS
    if code == _NULL_MX_CODE:
        return True
    return (
        code in _GONE_CODES
        and _GONE_TEXT.search(text) is not None
        and _NOT_GONE_TEXT.search(text) is None
    )
