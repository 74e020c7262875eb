#!/usr/bin/env python3
"""A BENCHMARK BASELINE, NOT A PRODUCT PATH: `send` with no ledger at all.

bench/ledger_cost.py times `appeal-mailer send` with the ledger at each
durability level against this script, so the difference is what the ledger
costs. It does what a real `send` does except every ledger read and write, in
one fresh process, with appeal-mailer's own parts:

  - the config, loaded by `load_settings` (the same file as the real send);
  - the pre-flight pass, `CampaignRun.prepare()`: the list read and every
    message rendered once before the first is sent;
  - the checked recipients read back from the pre-flight pass's temporary
    file (`Preflight.recipients()`, as the real run loads them into the
    ledger), and each recipient's message built again by
    `CampaignRun.wire_bytes` (Renderer + MessageBuilder) just before it is
    sent, as the real pipeline does;
  - `SMTPTransport` with `RateLimiter(rate, domain_limits)` from the config
    (`rate = 0` in the benchmark's config), the same number of concurrent
    workers as `[smtp] connections`, and the same attempts per message.

There is no ledger: no claim before DATA, no record after, no resume, no
suppression check, no run log. Nothing here is safe to use for a real
campaign (a crash would leave no trace of who got the message); it exists only
to be measured. The CampaignRun is built with `ledger=None`, so any ledger
access would fail loudly instead of being measured by mistake.

    python bench/no_ledger_send.py --config CFG LIST [--template appeal]

Exit status 0 when every message of the list was sent (250), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
from collections.abc import Sequence
from pathlib import Path

from appeal_mailer.campaign import CampaignRun, Preflight
from appeal_mailer.config import Settings, load_settings
from appeal_mailer.models import Envelope, State
from appeal_mailer.ratelimit import RateLimiter
from appeal_mailer.transport import SMTPTransport


async def deliver_all(
    run: CampaignRun, transport: SMTPTransport, settings: Settings, preflight: Preflight
) -> collections.Counter[State]:
    """Render each recipient's message and send it over `connections` concurrent workers."""
    connections = transport.connections
    sender = settings.campaign.sender[1]
    # The same number of attempts the real pipeline allows a message never tried before.
    allowed = min(settings.sending.attempts_per_run, settings.sending.max_attempts)
    # Bounded, like the real pipeline's: rendering keeps just ahead of the workers.
    queue: asyncio.Queue[Envelope | None] = asyncio.Queue(maxsize=2 * connections)
    states: collections.Counter[State] = collections.Counter()

    async def produce() -> None:
        row_id = 0
        try:
            for item in preflight.recipients():
                row_id += 1
                envelope = Envelope(
                    row_id,
                    sender,
                    item.email,
                    run.builder.message_id(run.step, item.email),
                    run.wire_bytes(item),
                )
                await queue.put(envelope)
        finally:
            for _ in range(connections):
                await queue.put(None)

    async def worker() -> None:
        while (envelope := await queue.get()) is not None:
            result = await transport.send(envelope, attempts_allowed=allowed)
            states[result.state] += 1
            if result.state is not State.SENT:
                print(f"not sent: {result}", file=sys.stderr)

    await transport.open()
    try:
        await asyncio.gather(produce(), *(worker() for _ in range(connections)))
    finally:
        await transport.close()
    return states


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--template", help="template to send [the config's]")
    parser.add_argument("list_path", type=Path)
    args = parser.parse_args(argv)

    settings = load_settings(args.config)
    limiter = RateLimiter(settings.sending.rate, dict(settings.sending.domain_limits))
    transport = SMTPTransport(settings.smtp, settings.sending, limiter)
    run = CampaignRun(
        settings,
        None,  # type: ignore[arg-type]  # no ledger: that is the point of this baseline
        transport,
        template=args.template or settings.campaign.template,
        list_path=args.list_path,
        pace=limiter,
    )
    if limiter.limited_domains():
        # The real pipeline paces each limited domain's first attempts in its own lane.
        parser.error("per-domain limits are not modelled by this baseline")
    preflight = run.prepare()
    states = asyncio.run(deliver_all(run, transport, settings, preflight))
    sent = states[State.SENT]
    others = {str(state): count for state, count in states.items() if state is not State.SENT}
    print(f"no ledger: {preflight.valid} valid, {sent} sent, others {others}")
    return 0 if sent == preflight.valid and not others else 1


if __name__ == "__main__":
    sys.exit(main())
